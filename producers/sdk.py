"""The vehicle-side SDK: validate samples at the call, batch them into uploads,
publish idempotently keyed by VIN, and say exactly what was not delivered.

    publisher = TelemetryPublisher(bootstrap, "vtp.uploads", firmware="3.2.1")
    publisher.add_sample(vin, {"event_time_ms": t, "seq": n, "speed": 42.0})
    report = publisher.close()   # report.failed lists undelivered upload ids
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from schemas import MAX_SAMPLES_PER_UPLOAD, MAX_UPLOAD_BYTES, SchemaStore, default_store
from schemas.registry import VIN_PATTERN, Registration, encode_registration
from schemas.signals import sample_problems, sample_signals


class InvalidSample(ValueError):
    """A sample or upload the pipeline would reject; nothing was buffered or sent."""


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (upload id, error)
    pending: int = 0  # still unacknowledged when flush timed out

    @property
    def ok(self) -> bool:
        return not self.failed and self.pending == 0


def producer_config(bootstrap: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The vehicle side's producer settings. The server's producers use the same ones from
    vtp.core.kafka; the SDK keeps its own copy because it ships without the server."""
    return {
        "bootstrap.servers": bootstrap,
        # Idempotence: a retried send never duplicates a message in the partition.
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 20,
        # Java-compatible hashing, so VIN keys land where Faust/aiokafka expect them.
        "partitioner": "murmur2_random",
        **(extra or {}),
    }


class TelemetryPublisher:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        firmware: str = "vtp-sdk",
        max_samples: int = 60,
        max_age_s: float = 10.0,
        schema_version: int | None = None,
        kafka_extra: dict[str, Any] | None = None,
        store: SchemaStore | None = None,
    ):
        if not 1 <= max_samples <= MAX_SAMPLES_PER_UPLOAD:
            raise ValueError(f"max_samples must be 1 to {MAX_SAMPLES_PER_UPLOAD}")
        self._store = store or default_store()
        self._schema = self._store.get("VehicleUpload", schema_version)
        self._signals = sample_signals(self._schema)
        self._producer = Producer(producer_config(bootstrap, kafka_extra))
        self._topic = topic
        self._firmware = firmware
        self._max_samples = max_samples
        self._max_age_s = max_age_s
        self._buffers: dict[str, list[dict[str, Any]]] = {}
        self._opened_at: dict[str, float] = {}
        self._last_seq: dict[str, int] = {}
        self.report = DeliveryReport()

    # -- per-sample API (gateways) ----------------------------------------------
    def add_sample(self, vin: str, sample: dict[str, Any]) -> None:
        """Buffer one sample; raises InvalidSample naming every problem."""
        if not isinstance(vin, str) or not VIN_PATTERN.match(vin):
            raise InvalidSample(f"{vin!r} is not a 17-character VIN (A-Z without I, O, Q; 0-9)")
        problems = sample_problems(sample, self._signals)
        seq = sample.get("seq")
        if not problems and isinstance(seq, int) and seq <= self._last_seq.get(vin, -1):
            problems.append(f"seq {seq} does not increase (last was {self._last_seq[vin]})")
        if problems:
            raise InvalidSample(f"sample of {vin} rejected: " + "; ".join(problems))
        self._last_seq[vin] = sample["seq"]
        buffer = self._buffers.setdefault(vin, [])
        if not buffer:
            self._opened_at[vin] = time.monotonic()
        buffer.append(sample)
        if len(buffer) >= self._max_samples:
            self._send_buffer(vin)
        self._producer.poll(0)

    def publish_due(self) -> int:
        """Send every buffer older than max_age_s; call it from the gateway's loop."""
        now = time.monotonic()
        due = [
            v for v, b in self._buffers.items() if b and now - self._opened_at[v] >= self._max_age_s
        ]
        for vin in due:
            self._send_buffer(vin)
        return len(due)

    def _send_buffer(self, vin: str) -> None:
        samples = self._buffers.pop(vin, [])
        if samples:
            self.publish_upload(
                {
                    "vin": vin,
                    "upload_id": str(uuid.uuid4()),
                    "sent_at_ms": int(time.time() * 1000),
                    "gateway_firmware": self._firmware,
                    "samples": samples,
                }
            )

    # -- whole uploads (simulator, store-and-forward replays) ---------------------
    def encode(self, upload: dict[str, Any]) -> bytes:
        """The upload as this publisher's writer schema frames it."""
        try:
            value = self._store.encode(upload, self._schema)
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidSample(
                f"upload {upload.get('upload_id')!r} cannot be encoded: {exc}"
            ) from None
        if len(value) > MAX_UPLOAD_BYTES:
            raise InvalidSample(
                f"upload {upload.get('upload_id')!r} is {len(value)} bytes; the pipeline takes "
                f"at most {MAX_UPLOAD_BYTES}: send fewer samples per upload"
            )
        return value

    def publish_upload(self, upload: dict[str, Any]) -> None:
        self.publish_raw(upload["vin"].encode(), self.encode(upload), upload["upload_id"])

    def publish_raw(
        self, key: bytes | None, value: bytes, label: str = "", created_ms: int | None = None
    ) -> None:
        """Send bytes as they are (tests use it to inject malformed messages)."""
        stamp = {"timestamp": created_ms} if created_ms is not None else {}
        produce_waiting(
            self._producer,
            self._topic,
            key=key,
            value=value,
            on_delivery=self._delivered(label),
            **stamp,
        )

    def _delivered(self, label: str) -> Callable[[KafkaError | None, Message], None]:
        def callback(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.report.delivered += 1
            else:
                self.report.failed.append((label, str(err)))

        return callback

    def flush(self, timeout: float = 30.0) -> DeliveryReport:
        """Send every buffered sample and wait for acknowledgements."""
        for vin in list(self._buffers):
            self._send_buffer(vin)
        self.report.pending = self._producer.flush(timeout)
        return self.report

    def close(self, timeout: float = 30.0) -> DeliveryReport:
        return self.flush(timeout)


def produce_waiting(producer: Producer, topic: str, **record: Any) -> None:
    """Produce, waiting for deliveries to make room while the local queue is full, so a large
    batch is slowed down rather than refused."""
    while True:
        try:
            producer.produce(topic, **record)
            return
        except BufferError:
            producer.poll(0.1)


def publish_registrations(
    bootstrap: str,
    topic: str,
    registrations: list[Registration],
    extra: dict[str, Any] | None = None,
) -> DeliveryReport:
    """Write a region's vehicle registry entries (its compacted topic, keyed by VIN)."""
    producer = Producer(producer_config(bootstrap, extra))
    report = DeliveryReport()

    def callback(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            report.delivered += 1
        else:
            report.failed.append(((msg.key() or b"").decode(), str(err)))

    for reg in registrations:
        produce_waiting(
            producer,
            topic,
            key=reg.vin.encode(),
            value=encode_registration(reg),
            on_delivery=callback,
        )
    report.pending = producer.flush(30)
    return report

"""The sink's own copy of its region's vehicle registry.

Residency is checked twice, independently: the worker against its registry table, the
sink against this copy, read by a consumer of its own from the region's registry topic
(every partition, from the beginning, never committed). A message tells which registry
revision the worker decided with; the sink first reads its copy up to that revision,
then decides for itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas import FramingError
from schemas.registry import Registration, decode_registration
from vtp.kafka_retry import retry_kafka
from vtp.settings import Settings

log = logging.getLogger("vtp.sink")


class RegistryUnavailable(RuntimeError):
    """The registry topic cannot be read."""


class RegistryCopy(Mapping[str, Registration]):
    def __init__(self, settings: Settings):
        self.topic = settings.topics.vehicles
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap(),
                # Assigned, never subscribed or committed: the group id is only a label.
                "group.id": f"{settings.topics.sink_group}-registry",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                **settings.kafka_extra,
            }
        )
        self._by_vin: dict[str, Registration] = {}
        self._gave_up: dict[str, int] = {}  # revisions waited for in vain (a removed entry)
        self.invalid = 0

    def start(self, timeout: float = 60.0) -> None:
        """Assign every partition from the beginning and read up to the current end."""
        meta = retry_kafka(
            lambda: self._consumer.list_topics(self.topic, timeout=10), "registry metadata"
        )
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise RegistryUnavailable(f"the registry topic {self.topic} does not exist")
        partitions = sorted(topic.partitions)
        ends = {}
        for p in partitions:
            low, high = retry_kafka(
                lambda p=p: self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=10
                ),
                "registry watermarks",
            )
            if high > low:
                ends[p] = high
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for p, offset in self._poll(0.5).items():
                if offset + 1 >= ends.get(p, 0):
                    ends.pop(p, None)
        if ends:
            raise RegistryUnavailable(
                f"the registry copy did not reach the end of {self.topic} within {timeout:.0f} s"
            )
        log.info("registry copy: %d vehicles from %s", len(self._by_vin), self.topic)

    def _poll(self, timeout: float) -> dict[int, int]:
        """Apply what is there; returns the last offset applied per partition."""
        applied: dict[int, int] = {}
        for m in self._consumer.consume(num_messages=5000, timeout=timeout):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    applied[m.partition()] = max(applied.get(m.partition(), -1), m.offset() - 1)
                elif err.fatal():
                    raise RegistryUnavailable(f"registry consumer failed: {err}")
                continue
            vin = (m.key() or b"").decode(errors="replace")
            if m.value() is None:
                self._by_vin.pop(vin, None)
            else:
                try:
                    self._by_vin[vin] = decode_registration(m.value())
                except FramingError:
                    self.invalid += 1  # the worker dead-letters it; the vehicle stays as it was
            applied[m.partition()] = m.offset()
        return applied

    def refresh(self) -> None:
        self._poll(0)

    def wait_for(self, wanted: dict[str, int], timeout: float) -> list[str]:
        """Read on until each VIN's registration has at least the wanted revision;
        returns the VINs still behind when ``timeout`` ran out. A revision waited for in
        vain once (its entry was removed since) is not waited for again."""
        deadline = time.monotonic() + timeout
        while True:
            behind = [
                vin
                for vin, revision in wanted.items()
                if ((reg := self._by_vin.get(vin)) is None or reg.revision < revision)
                and self._gave_up.get(vin, -1) < revision
            ]
            if not behind or time.monotonic() >= deadline:
                self._gave_up.update({vin: wanted[vin] for vin in behind})
                return behind
            self._poll(0.2)

    def close(self) -> None:
        self._consumer.close()

    def __getitem__(self, vin: str) -> Registration:
        return self._by_vin[vin]

    def __iter__(self):
        return iter(self._by_vin)

    def __len__(self) -> int:
        return len(self._by_vin)

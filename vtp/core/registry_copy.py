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
from collections.abc import Iterator, Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas import FramingError
from schemas.registry import Registration, decode_registration
from vtp.core.kafka import coordinates, retry_kafka
from vtp.core.settings import Settings

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
        self._partitions: list[int] = []
        self._read_to: dict[int, int] = {}  # next offset to read, per partition
        self.invalid = 0

    def start(self, timeout: float = 60.0) -> None:
        """Assign every partition from the beginning and read up to the current end."""
        meta = retry_kafka(
            lambda: self._consumer.list_topics(self.topic, timeout=10), "registry metadata"
        )
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise RegistryUnavailable(f"the registry topic {self.topic} does not exist")
        partitions = self._partitions = sorted(topic.partitions)
        ends = {}
        for p in partitions:
            low, high = self._watermarks(p)
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
                    _, partition, offset = coordinates(m)
                    applied[partition] = max(applied.get(partition, -1), offset - 1)
                    self._read_to[partition] = max(self._read_to.get(partition, 0), offset)
                elif err.fatal():
                    raise RegistryUnavailable(f"registry consumer failed: {err}")
                continue
            _, partition, offset = coordinates(m)
            self._read_to[partition] = offset + 1
            vin = (m.key() or b"").decode(errors="replace")
            value = m.value()
            if value is None:
                self._by_vin.pop(vin, None)
            else:
                try:
                    self._by_vin[vin] = decode_registration(value)
                except FramingError:
                    self.invalid += 1  # the worker dead-letters it; the vehicle stays as it was
            applied[partition] = offset
        return applied

    def refresh(self) -> None:
        self._poll(0)

    def _at_end(self) -> bool:
        """Has the copy read everything the registry topic holds right now?"""
        for p in self._partitions:
            _, high = self._watermarks(p)
            if self._read_to.get(p, 0) < high:
                return False
        return True

    def _watermarks(self, partition: int) -> tuple[int, int]:
        return retry_kafka(
            lambda: self._consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=10
            ),
            "registry watermarks",
        )

    def wait_for(self, wanted: dict[str, int], timeout: float) -> list[str]:
        """Read on until each VIN's registration has at least the wanted revision, or
        until the copy holds all the registry holds (the entry was removed or rewritten
        since the worker read it: the registry as it is now decides). Returns the VINs
        decided that way; raises RegistryUnavailable when the copy cannot catch up within
        ``timeout``, so nothing is stored under an owner the copy merely has not read."""
        deadline = time.monotonic() + timeout
        while True:
            behind = [
                vin
                for vin, revision in wanted.items()
                if (reg := self._by_vin.get(vin)) is None or reg.revision < revision
            ]
            if not behind:
                return []
            if self._at_end():
                return behind
            if time.monotonic() >= deadline:
                raise RegistryUnavailable(
                    f"the registry copy did not catch up with {self.topic} within "
                    f"{timeout:.0f} s ({len(behind)} vehicles behind the worker, e.g. {behind[0]})"
                )
            self._poll(0.2)

    def close(self) -> None:
        self._consumer.close()

    def __getitem__(self, vin: str) -> Registration:
        return self._by_vin[vin]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_vin)

    def __len__(self) -> int:
        return len(self._by_vin)

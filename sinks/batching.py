"""Per-partition batches cut by offsets, so a retried batch is the same batch.

A batch holds consecutive messages of one topic-partition. It is cut when it holds
``max_messages`` (a message of many uploads weighs as many), or when it has waited
``flush_after_s`` (per topic if named) — a time cut is safe only because the sink
records every batch's offset range before inserting it; after a crash the recorded
range is imposed again (a *forced* batch), so the replayed insert carries the same
deduplication token. A forced batch is never cut early.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

ForcedEndLookup = Callable[[str, int, int], "int | None"]
Item = TypeVar("Item")


@dataclass
class PartitionBatch(Generic[Item]):
    topic: str
    partition: int
    started_at: float
    forced_last: int | None = None
    offsets: list[int] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    weight: int = 0

    @property
    def first_offset(self) -> int:
        return self.offsets[0]

    @property
    def last_offset(self) -> int:
        return self.offsets[-1]

    @property
    def token(self) -> str:
        return f"{self.topic}-{self.partition}-{self.first_offset}-{self.last_offset}"

    def __len__(self) -> int:
        return len(self.offsets)


class Batcher(Generic[Item]):
    def __init__(
        self,
        max_messages: int,
        flush_after_s: float,
        forced_end: ForcedEndLookup,
        flush_after_by_topic: dict[str, float] | None = None,
    ):
        self._max = max_messages
        self._flush_after = flush_after_s
        self._flush_after_by_topic = flush_after_by_topic or {}
        self._forced_end = forced_end
        self._open: dict[tuple[str, int], PartitionBatch[Item]] = {}
        self._ready: list[PartitionBatch[Item]] = []

    def add(
        self, topic: str, partition: int, offset: int, item: Item, now: float, weight: int = 1
    ) -> None:
        """``weight``: how much of ``max_messages`` the item takes (a batch message counts
        its uploads)."""
        key = (topic, partition)
        batch = self._open.get(key)
        if batch is not None and batch.forced_last is not None and offset > batch.forced_last:
            self._ready.append(self._open.pop(key))
            batch = None
        if batch is None:
            batch = PartitionBatch(
                topic, partition, now, self._forced_end(topic, partition, offset)
            )
            self._open[key] = batch
        batch.offsets.append(offset)
        batch.items.append(item)
        batch.weight += weight
        if self._complete(batch):
            self._ready.append(self._open.pop(key))

    def _complete(self, batch: PartitionBatch[Item]) -> bool:
        if batch.forced_last is not None:
            return batch.last_offset >= batch.forced_last
        return batch.weight >= self._max

    def take_ready(self, now: float, final: bool = False) -> list[PartitionBatch[Item]]:
        """Batches to insert now. ``final`` (shutdown) also cuts every unforced batch."""
        for key, batch in list(self._open.items()):
            waits = self._flush_after_by_topic.get(batch.topic, self._flush_after)
            if batch.forced_last is None and (final or now - batch.started_at >= waits):
                self._ready.append(self._open.pop(key))
        ready, self._ready = self._ready, []
        return ready

    def drop(self, topic: str, partitions: list[int]) -> None:
        """Forget uninserted batches of revoked partitions: their new owner re-reads them."""
        for p in partitions:
            self._open.pop((topic, p), None)
        self._ready = [
            b for b in self._ready if not (b.topic == topic and b.partition in partitions)
        ]

    def pending(self) -> int:
        return sum(len(b) for b in self._open.values()) + sum(len(b) for b in self._ready)

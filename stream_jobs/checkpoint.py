"""Checkpoints of the worker's state: written at most every ``VTP_STATE_CHECKPOINT_S``,
and the uploads they cover committed only then.

Writing every changed vehicle's state after every batch cost the worker most of its
changelog bytes (a vehicle a batch touches is written whole, its reorder buffer
included, however few samples the batch brought). Instead the states stay in memory and
a checkpoint writes each one changed since the last, once. The raw uploads' offsets are
committed only up to what the last checkpoint covers (``faust_fixes.commit_below``): a
worker that dies between two checkpoints is restarted from there and reads those
uploads again, which its states (restored from the changelog) take as new or, where a
state was written later, skip as replays (``sessions.ingest``). The outputs of a
replayed upload are sent again, as after any restart: the sink and the dead-letter count
tell a replay by its raw source offset.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

IDLE_SHARE = 0.2  # of the interval: a stream this long without a batch went quiet


class Checkpoints:
    """Which raw offsets the last checkpoint covers, per partition of the uploads topic.

    ``write`` stores what changed since the last checkpoint; the caller of ``processed``
    and ``run`` holds the lock that keeps batches out while a checkpoint is written."""

    def __init__(
        self,
        interval_s: float,
        write: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval_s = interval_s
        self._write = write
        self._clock = clock
        self._idle_s = interval_s * IDLE_SHARE
        self._processed: dict[int, int] = {}  # partition -> next offset after the batches done
        self._covered: dict[int, int] = {}  # partition -> next offset the last write covers
        self._last = self._last_batch = clock()
        self._epoch = 0  # moves with every forget()

    def processed(self, last_offsets: Mapping[int, int]) -> None:
        """A batch is done (every output acknowledged): partition -> its last offset."""
        for partition, offset in last_offsets.items():
            if offset + 1 > self._processed.get(partition, 0):
                self._processed[partition] = offset + 1
        self._last_batch = self._clock()

    def limit(self, partition: int) -> int:
        """Offsets of ``partition`` below this may be committed (0 before a checkpoint)."""
        return self._covered.get(partition, 0)

    def due(self) -> bool:
        """Anything processed the last checkpoint does not cover, and the interval over or
        no batch for a fifth of it (a stream that went quiet gets its commits sooner)."""
        if self._processed == self._covered:
            return False
        now = self._clock()
        return now - self._last >= self.interval_s or now - self._last_batch >= self._idle_s

    async def run(self) -> None:
        """Write; then what was processed before the write began may be committed
        (unless partitions moved meanwhile: the memory written is not theirs)."""
        reached, epoch = dict(self._processed), self._epoch
        await self._write()
        if epoch == self._epoch:
            self._covered.update(reached)
        self._last = self._clock()

    def forget(self) -> None:
        """Partitions moved: commits start again from what Kafka has."""
        self._processed.clear()
        self._covered.clear()
        self._epoch += 1

"""The worker's memory of recent upload ids per vehicle (``validate.SeenUploads``), kept
between batches and written to its changelog-backed table at each checkpoint."""

from __future__ import annotations

import asyncio
import json

import faust

from stream_jobs.expiry import QuietSweep, forget_quiet, sweep_interval_s
from stream_jobs.faust_fixes import put_durably
from stream_jobs.validate import RawUpload, SeenUploads
from vtp.core.settings import Settings


class SeenTable:
    """``table``: the worker's changelog-backed ``seen_uploads`` table (``bytes_table``)."""

    def __init__(self, table: faust.Table[bytes, bytes], settings: Settings):
        self.table = table
        self._settings = settings
        self._sweep = QuietSweep(sweep_interval_s(settings.vehicle_state_ttl_s))
        self.forget()

    def forget(self) -> None:
        """Partitions moved, or a checkpoint wrote what changed: the table is the truth
        (what memory holds of it lasts at most one checkpoint interval)."""
        self.uploads = SeenUploads(load=self._stored)
        # routed VIN -> (the partition its messages came on, the latest broker time of one)
        self._heard: dict[str, tuple[int, int]] = {}

    def heard(self, routed: list[RawUpload]) -> None:
        """The batch's routed uploads (their VINs' entries are written at the checkpoint)."""
        for r in routed:
            if r.key:
                vin = r.key.decode(errors="replace")
                _, before = self._heard.get(vin, (r.partition, 0))
                self._heard[vin] = (r.partition, max(before, r.timestamp_ms))

    def _stored(self, vin: str) -> dict[str, str]:
        stored = json.loads(self.table.get(vin.encode()) or b"{}")
        ids: dict[str, str] = stored.get("ids", stored)  # before vtp kept "touched": ids only
        return ids

    async def write(self) -> None:
        """Durably, the entries changed since the last write, each in the partition of
        its vehicle's messages (so a worker that takes the partition over has it)."""
        writes = []
        for vin in self.uploads.changed:
            partition, touched = self._heard.get(vin, (None, None))
            value = json.dumps({"ids": self.uploads.by_vin[vin], "touched": touched})
            writes.append(put_durably(self.table, vin.encode(), value.encode(), partition))
        # Memory keeps nothing past a checkpoint: a key met once (a dead letter, a vehicle
        # not registered here) must not stay for good.
        self.forget()
        await asyncio.gather(*writes)

    async def forget_quiet(self, assigned: set[int]) -> int:
        """After a write (the table then holds what memory does): vehicles gone quiet."""

        async def closing(key: bytes, value: bytes) -> None:
            vin = key.decode(errors="replace")
            self.uploads.by_vin.pop(vin, None)
            self._heard.pop(vin, None)

        return await forget_quiet(
            self.table,
            self._sweep,
            ttl_ms=int(self._settings.vehicle_state_ttl_s * 1000),
            partitions=self._settings.topic_partitions,
            assigned=assigned,
            touched_of=lambda value: json.loads(value).get("touched"),
            closing=closing,
        )

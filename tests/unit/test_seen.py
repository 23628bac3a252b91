"""The worker's seen upload ids between checkpoints (stream_jobs.seen)."""

from __future__ import annotations

import asyncio
import json

from stream_jobs.seen import SeenTable
from stream_jobs.validate import DeadLettered, Quarantined, Routed, route_batch
from tests.unit.test_validate import LIMITS, NOW, REGISTRY, STORE, VIN, raw, upload
from vtp.core.settings import load_settings

UNREGISTERED = "LRW3E7EK4NC009999"


class Table:
    """What SeenTable and put_durably use of a Faust table: its data and changelog."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.changelog: list[tuple[int | None, bytes, bytes | None]] = []
        self.name = "seen_uploads"

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def keys(self):
        return list(self.data)

    async def send_changelog(self, partition, key, value, **_) -> None:
        self.changelog.append((partition, key, value))


def _batch(seen: SeenTable, raws):
    outcomes = route_batch(raws, STORE, REGISTRY, seen.uploads, LIMITS)
    seen.heard([r for r, o in zip(raws, outcomes, strict=True) if isinstance(o, Routed)])
    return outcomes


def test_a_checkpoint_writes_the_routed_vehicles_and_memory_keeps_nothing_after_it():
    table = Table()
    seen = SeenTable(table, load_settings({}))
    first = raw(upload(upload_id="u-1"), offset=7, partition=2, received=NOW - 5)
    outcomes = _batch(
        seen,
        [
            first,
            raw(upload(vin=UNREGISTERED), offset=8, partition=2),  # quarantined
            raw(upload(), key=b"x" * 100_000, offset=9, partition=2),  # dead-lettered
        ],
    )
    assert isinstance(outcomes[0], Routed)
    assert isinstance(outcomes[1], Quarantined) and isinstance(outcomes[2], DeadLettered)
    asyncio.run(seen.write())
    assert [(p, k) for p, k, _ in table.changelog] == [(2, VIN.encode())]
    stored = json.loads(table.data[VIN.encode()])
    assert stored == {"ids": {"u-1": first.source}, "touched": NOW - 5}
    assert seen.uploads.by_vin == {} and seen.uploads.changed == set()
    assert seen._heard == {}  # nothing of the other keys stays either

    # the next batch reads the ids back from the table: a resend is still a duplicate,
    # a replay of the same message still a replay
    again = _batch(
        seen,
        [raw(upload(upload_id="u-1"), offset=10, partition=2), first],
    )
    assert isinstance(again[0], DeadLettered) and again[0].reason == "duplicate_upload"
    assert isinstance(again[1], Routed)

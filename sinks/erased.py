"""Judging what the sink stores by the moments it speaks for. Pure.

Whose it is: an aggregate is stored only for an owner who held the vehicle here at some
moment of its span (``held_by_owner``).

What the sink must not store again after an owner's erasure:

An erasure removes everything of the owner from before its time (the horizon). A
replayed or late message about that time must not bring it back, so the sink drops
samples whose event time is at or before the horizon, or that reached vtp at or before
it (whatever times the vehicle wrote), and aggregates that begin at or before it (a
daily summary is judged by the earliest instant its local day can start; an empty open
slot by the moment it describes, so a slot opened after the erasure is emptied again
when its trip or charge ends).
Data about moments after the erasure is the owner's new data and is stored.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.registry import Registration
from sinks.rows import StoredUpload

# The earliest local midnight of a date is 14 h before UTC midnight (UTC+14); a date
# spans from then to its latest end (UTC-12).
_EARLIEST_OFFSET = timedelta(hours=14)
_DAY_SPAN_MS = (24 + 14 + 12) * 3_600_000


def drop_erased_samples(
    uploads: list[StoredUpload], horizons: dict[str, int]
) -> tuple[list[StoredUpload], int]:
    """(uploads with only the samples to keep, samples dropped); empty uploads vanish."""
    kept, dropped = [], 0
    for up in uploads:
        horizon = horizons.get(up.owner_id)
        if horizon is None:
            kept.append(up)
            continue
        if up.received_ms <= horizon:  # in the pipeline when the owner erased: gone too
            dropped += len(up.record["samples"])
            continue
        samples = [s for s in up.record["samples"] if s["event_time_ms"] > horizon]
        dropped += len(up.record["samples"]) - len(samples)
        if samples:
            kept.append(replace(up, record={**up.record, "samples": samples}))
    return kept, dropped


def aggregate_start_ms(record: dict[str, Any]) -> int | None:
    if record.get("start_ms") is not None:
        return int(record["start_ms"])
    if record.get("as_of_ms") is not None:  # an empty open slot: the moment it speaks for
        return int(record["as_of_ms"])
    if record.get("date"):
        day = datetime.fromisoformat(record["date"]).replace(tzinfo=UTC)
        return int((day - _EARLIEST_OFFSET).timestamp() * 1000)
    return None


def keep_aggregate(record: dict[str, Any], horizons: dict[str, int]) -> bool:
    horizon = horizons.get(record.get("owner_id", ""))
    if horizon is None:
        return True
    start = aggregate_start_ms(record)
    return start is not None and start > horizon


def held_by_owner(record: dict[str, Any], registration: Registration | None, region: str) -> bool:
    """The sink's own check of an aggregate: its owner held the vehicle here at some
    moment of the record's span (a day spans its whole local date). An empty open slot
    only says the owner has nothing open: any period of theirs here will do (the moment
    it speaks for may already be the next owner's, as when a sale empties it)."""
    if registration is None:
        return False
    owner = record["owner_id"]
    if record.get("start_ms") is None and not record.get("date"):
        return any(p.is_in(region) and p.owner_id == owner for p in registration.periods)
    start = aggregate_start_ms(record)
    if start is None:
        return False
    end = record.get("end_ms") or start + _DAY_SPAN_MS
    return registration.owned_in(region, owner, start, int(end))

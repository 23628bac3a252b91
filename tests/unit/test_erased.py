"""After an erasure the sink stores nothing of the owner from before it."""

from __future__ import annotations

from sinks.erased import aggregate_start_ms, drop_erased_samples, held_by_owner, keep_aggregate
from sinks.rows import StoredUpload

HORIZON = 1_000_000


def _upload(owner: str, times: list[int], received: int = HORIZON + 60_000) -> StoredUpload:
    record = {
        "vin": "V",
        "upload_id": f"u{times[0]}",
        "samples": [{"event_time_ms": t, "seq": i} for i, t in enumerate(times)],
    }
    return StoredUpload(record, owner, "eu", 1, received, "src", "t", 0, 0)


def test_samples_at_or_before_the_horizon_go_later_ones_stay():
    uploads = [
        _upload("erased", [HORIZON - 5, HORIZON]),  # wholly before: gone
        _upload("erased", [HORIZON, HORIZON + 1]),  # straddles: the later sample stays
        _upload("other", [1, 2]),  # another owner: untouched
    ]
    kept, dropped = drop_erased_samples(uploads, {"erased": HORIZON})
    assert dropped == 3
    assert [[s["event_time_ms"] for s in u.record["samples"]] for u in kept] == [
        [HORIZON + 1],
        [1, 2],
    ]
    assert uploads[1].record["samples"][0]["event_time_ms"] == HORIZON  # input not mutated


def test_aggregates_that_begin_before_the_horizon_are_dropped():
    erased = {"erased": HORIZON}
    assert not keep_aggregate({"owner_id": "erased", "start_ms": HORIZON}, erased)
    assert keep_aggregate({"owner_id": "erased", "start_ms": HORIZON + 1}, erased)
    assert keep_aggregate({"owner_id": "other", "start_ms": 0}, erased)
    assert not keep_aggregate({"owner_id": "erased", "kind": "open_trip", "start_ms": None}, erased)


def test_a_day_counts_from_its_earliest_local_midnight():
    start = aggregate_start_ms({"date": "2026-11-26"})
    assert start == 1_795_651_200_000 - 14 * 3_600_000  # 2026-11-26T00:00Z minus 14 h
    horizon = {"erased": start}
    assert not keep_aggregate({"owner_id": "erased", "date": "2026-11-26"}, horizon)
    assert keep_aggregate({"owner_id": "erased", "date": "2026-11-27"}, horizon)


def test_an_upload_received_before_the_erasure_never_comes_back_whatever_its_times():
    # stamped minutes ahead (within the allowed skew), received before the erasure
    ahead = _upload("erased", [HORIZON + 120_000, HORIZON + 180_000], received=HORIZON - 1)
    kept, dropped = drop_erased_samples([ahead], {"erased": HORIZON})
    assert (kept, dropped) == ([], 2)


def test_an_empty_open_slot_is_judged_by_the_moment_it_describes():
    empty = {"kind": "open_trip", "owner_id": "erased", "active": False}
    assert keep_aggregate({**empty, "as_of_ms": HORIZON + 1}, {"erased": HORIZON})
    assert not keep_aggregate({**empty, "as_of_ms": HORIZON - 1}, {"erased": HORIZON})


def test_an_aggregate_is_kept_for_the_owner_who_held_the_vehicle_at_its_time():
    from schemas.registry import Period, Registration

    sale = HORIZON
    reg = Registration("V", (Period(0, "seller", "eu"), Period(sale, "buyer", "eu")))
    trip = {"kind": "trip", "owner_id": "seller", "start_ms": sale - 600_000, "end_ms": sale - 1}
    assert held_by_owner(trip, reg, "eu")
    assert not held_by_owner(dict(trip, owner_id="buyer"), reg, "eu")
    assert not held_by_owner(trip, reg, "cn") and not held_by_owner(trip, None, "eu")
    # the sale empties the seller's slot at a moment already the buyer's: still the seller's
    emptied = {"kind": "open_trip", "owner_id": "seller", "active": False, "as_of_ms": sale + 5000}
    assert held_by_owner(emptied, reg, "eu")
    assert not held_by_owner(dict(emptied, owner_id="stranger"), reg, "eu")
    day = {"kind": "day", "owner_id": "buyer", "date": "1970-01-01"}
    assert held_by_owner(day, reg, "eu")

"""Sessions over ownership changes: a sale, a move and a deregistration close the old
owner's trip, charge and days, and neither owner's records reach into the other's time."""

import pytest

from schemas.registry import Period, Registration
from stream_jobs.sessions import SessionConfig, advance, flush, ingest, new_state
from tests.unit.test_sessions import CFG, Car, at

START = at("2026-11-06T07:00:00")
SALE = START + 10 * 60_000 + 500  # ten minutes into a twenty-minute drive


def registration(*periods) -> Registration:
    return Registration("VIN", tuple(Period(*p) for p in periods))


def feed(state, samples, reg, size=10, config=CFG):
    records = []
    for i in range(0, len(samples), size):
        ingest(state, {"upload_id": f"u{i}", "samples": samples[i : i + size]}, config, reg)
        records += advance(state, config, reg)
    return records


def times(record) -> list[int]:
    if record["kind"] == "day" or not record.get("start_ms"):
        return []
    return [record["start_ms"], record["end_ms"]]


def test_a_car_sold_mid_trip_gives_each_owner_only_their_own_time():
    reg = registration((0, "seller", "cn"), (SALE, "buyer", "cn"))
    car = Car(START)
    car.drive(20 * 60)
    car.park(20 * 60)
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    records = feed(state, car.samples, reg) + flush(state, CFG, reg)

    by_owner = {"seller": [], "buyer": []}
    for r in records:
        by_owner[r["owner_id"]].append(r)
    seller_trips = [r for r in by_owner["seller"] if r["kind"] == "trip" and r["final"]]
    buyer_trips = [r for r in by_owner["buyer"] if r["kind"] == "trip" and r["final"]]
    assert len(seller_trips) == 1 and len(buyer_trips) == 1
    assert seller_trips[0]["start_ms"] == START and seller_trips[0]["end_ms"] < SALE
    assert buyer_trips[0]["start_ms"] >= SALE
    assert all(t < SALE for r in by_owner["seller"] for t in times(r))
    assert all(t >= SALE for r in by_owner["buyer"] for t in times(r))
    # each owner has their own day, and the distance of that day is split at the sale
    seller_day = [r for r in by_owner["seller"] if r["kind"] == "day" and r["final"]]
    buyer_day = [r for r in by_owner["buyer"] if r["kind"] == "day" and r["final"]]
    assert len(seller_day) == 1 and len(buyer_day) == 1
    assert seller_day[0]["distance_km"] == pytest.approx(6.0, abs=0.02)
    assert buyer_day[0]["distance_km"] == pytest.approx(6.0, abs=0.02)
    # the seller's open slots were emptied at the sale, after their last active one
    seller_slots = [r for r in by_owner["seller"] if r["kind"] == "open_trip"]
    assert seller_slots[-1]["active"] is False
    assert max(r["version"] for r in seller_slots if r["active"]) < seller_slots[-1]["version"]


def test_a_registry_change_closes_the_sessions_even_if_no_more_samples_come():
    car = Car(START)
    car.drive(5 * 60)
    before = registration((0, "owner-1", "cn"))
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    records = feed(state, car.samples, before)
    assert [r for r in records if r["kind"] == "open_trip"][-1]["active"]
    moved_at = car.t + 1000
    moved = registration((0, "owner-1", "cn"), (moved_at, None, "eu"))
    closed = advance(state, CFG, moved, close_ended=True)
    (trip,) = [r for r in closed if r["kind"] == "trip"]
    assert trip["final"] and trip["owner_id"] == "owner-1" and trip["end_ms"] < moved_at
    assert [r["active"] for r in closed if r["kind"] == "open_trip"] == [False]
    assert all(r["final"] for r in closed if r["kind"] == "day")
    assert state.owner_id is None and state.buffer == []
    # anything about the old period that still arrives is too late for it
    late = dict(car.samples[-1], seq=99_999, event_time_ms=car.t - 500)
    assert ingest(state, {"upload_id": "late", "samples": [late]}, CFG, moved).too_late == [99_999]


@pytest.mark.parametrize(
    "after",
    [
        registration((0, "owner-1", "cn"), (START + 3_000_000, None, None)),  # deregistered
        None,  # the vehicle left the registry
    ],
)
def test_a_deregistered_or_removed_vehicle_closes_at_once(after):
    car = Car(START)
    car.drive(5 * 60)
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    feed(state, car.samples, registration((0, "owner-1", "cn")))
    closed = advance(state, CFG, after, close_ended=True)
    assert [r["kind"] for r in closed if r["final"] and r["kind"] == "trip"] == ["trip"]
    assert state.owner_id is None


def test_samples_outside_every_period_here_are_not_aggregated():
    car = Car(START)
    car.drive(10 * 60)
    later = registration((START + 5 * 60_000, "owner-1", "cn"))
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    result = ingest(state, {"upload_id": "a", "samples": car.samples}, CFG, later)
    assert result.accepted == 5 * 60
    (trip,) = [r for r in flush(state, CFG, later) if r["kind"] == "trip"]
    assert trip["start_ms"] == START + 5 * 60_000


def test_a_preview_shows_the_current_owner_until_the_watermark_passes_the_sale():
    reg = registration((0, "seller", "cn"), (SALE, "buyer", "cn"))
    car = Car(START)
    car.drive(10 * 60 + 30)  # 30 s past the sale: still within the allowed lateness
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    records = feed(state, car.samples, reg, size=1000)
    assert {r["owner_id"] for r in records} == {"seller"}
    (slot,) = [r for r in records if r["kind"] == "open_trip"]
    assert slot["active"] and slot["end_ms"] < SALE
    assert flush(state, CFG, reg)  # the buyer's part comes out once released
    assert state.owner_id == "buyer"


def test_a_registry_entry_rewritten_under_the_state_closes_the_old_period():
    car = Car(START)
    car.drive(5 * 60)
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    feed(state, car.samples, registration((0, "owner-1", "cn")))
    rewritten = registration((0, "owner-2", "cn"))  # a corrected owner from the start
    closed = advance(state, SessionConfig(), rewritten, close_ended=True)
    assert {r["owner_id"] for r in closed if r["kind"] == "trip"} == {"owner-1"}
    assert state.owner_id is None

"""Daily summaries against hand-computed truth, to float precision: every interval between
two samples is shared out over the local days it spans; and aggregation gives the same
records whatever the batch boundaries."""

import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from producers.publish import DEFAULT_START_MS
from producers.simulator import build_fleet, simulate
from schemas.registry import Period, Registration
from stream_jobs.sessions import SessionConfig, advance, flush, ingest, new_state
from tests.unit.test_sessions import Car
from vtp.core.days import DayClock, day_shares

CFG = SessionConfig()
REG = Registration("VIN", (Period(0, "owner-1", "cn"),))


def at(text: str, zone: str = "Asia/Shanghai") -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def days_of(samples: list[dict], zone: str = "Asia/Shanghai", capacity: float = 60.0) -> dict:
    state = new_state("VIN", "cn", zone, capacity)
    ingest(state, {"upload_id": "u", "samples": samples}, CFG, REG)
    return {r["date"]: r for r in flush(state, CFG, REG) if r["kind"] == "day" and r["final"]}


def test_a_drive_across_midnight_is_split_at_midnight():
    # a sample a second from 23:50:00.5 to 00:09:59.5: the interval 23:59:59.5 .. 00:00:00.5
    # is half in each day; at 36 km/h every interval is exactly 10 m
    car = Car(at("2026-11-06T23:50:00") + 500, odo=1000.0, soc=80.0)
    car.drive(1200, kmh=36.0, use_per_km=0.25)
    days = days_of(car.samples)
    before, after = days["2026-11-06"], days["2026-11-07"]
    assert before["driving_s"] == after["driving_s"] == 599.5
    assert before["distance_km"] == pytest.approx(5.995, abs=1e-9)
    assert after["distance_km"] == pytest.approx(5.995, abs=1e-9)
    soc = [s["soc"] for s in car.samples]  # as the car reported it (to 0.001 %)
    straddle = soc[599] - soc[600]
    assert before["energy_used_kwh"] == pytest.approx(
        (soc[0] - soc[599] + straddle / 2) * 0.6, abs=1e-9
    )
    assert after["energy_used_kwh"] == pytest.approx(
        (straddle / 2 + soc[600] - soc[1199]) * 0.6, abs=1e-9
    )
    assert (before["trips"], after["trips"]) == (1, 0)
    assert (before["samples"], after["samples"]) == (600, 600)


def test_a_parking_gap_of_days_gives_every_day_its_share_and_no_day_more_than_it_has():
    car = Car(at("2026-11-09T12:00:00"), soc=60.0)  # a Monday noon
    car.sample()
    car.t, car.soc = at("2026-11-12T08:00:00"), 58.8  # Thursday 08:00, 1.2 points drained
    car.sample()
    days = days_of(car.samples)
    assert sorted(days) == ["2026-11-09", "2026-11-10", "2026-11-11", "2026-11-12"]
    hours = {"2026-11-09": 12, "2026-11-10": 24, "2026-11-11": 24, "2026-11-12": 8}
    gap_h = 68
    for date, h in hours.items():
        assert days[date]["parked_s"] == h * 3600, date
        assert days[date]["idle_drain_kwh"] == pytest.approx(1.2 * h / gap_h / 100 * 60, abs=1e-9)
    assert days["2026-11-10"]["samples"] == days["2026-11-11"]["samples"] == 0


def test_a_day_of_23_hours_holds_23_hours():
    zone = "Europe/Berlin"  # clocks go forward on 2026-03-29: that day has 23 hours
    car = Car(at("2026-03-28T23:00:00", zone))
    car.park(26 * 3600, every=600)
    day = days_of(car.samples, zone)["2026-03-29"]
    assert day["parked_s"] == 23 * 3600
    clock = DayClock(zone)
    assert day_shares(clock, at("2026-03-28T12:00:00", zone), at("2026-03-30T12:00:00", zone)) == [
        ("2026-03-28", 12 * 3_600_000),
        ("2026-03-29", 23 * 3_600_000),
        ("2026-03-30", 12 * 3_600_000),
    ]


def _final_records(uploads, fleet, batch: int) -> list[dict]:
    registry = {v.vin: v.registration_in(v.region) for v in fleet}
    states = {v.vin: new_state(v.vin, v.region, v.time_zone, v.battery_capacity_kwh) for v in fleet}
    out, late = [], 0
    for i in range(0, len(uploads), batch):
        touched = set()
        for upload in uploads[i : i + batch]:
            late += len(
                ingest(states[upload["vin"]], upload, CFG, registry[upload["vin"]]).too_late
            )
            touched.add(upload["vin"])
        for vin in sorted(touched):
            out += advance(states[vin], CFG, registry[vin])
    for vin, state in states.items():
        out += flush(state, CFG, registry[vin])
    finals = [{k: v for k, v in r.items() if k != "version"} for r in out if r["final"]]
    return sorted(finals, key=lambda r: (r["vin"], r["kind"], r.get("start_ms") or r.get("date")))


def test_the_records_do_not_depend_on_where_batches_begin_and_end():
    fleet = build_fleet(61, owners=3, vehicles=5)
    uploads = list(simulate(fleet, seed=61, start_ms=DEFAULT_START_MS, duration_s=4 * 3600))
    rng = random.Random(8)
    # out of order by up to three minutes: more than the lateness, so some are too late
    shuffled = sorted(uploads, key=lambda u: u["sent_at_ms"] + rng.uniform(0, 180_000))
    one, seven, thousand = (_final_records(shuffled, fleet, n) for n in (1, 7, 1000))
    assert one == seven == thousand
    assert any(r["kind"] == "trip" for r in one) and any(r["kind"] == "day" for r in one)

"""Sessionisation edge cases, written by hand."""

import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from schemas.registry import Period, Registration
from stream_jobs.sessions import SessionConfig, advance, flush, ingest, new_state

CFG = SessionConfig(trip_gap_ms=300_000, charge_gap_ms=300_000, allowed_lateness_ms=120_000)
SHANGHAI = ZoneInfo("Asia/Shanghai")
REG = Registration("VIN", (Period(0, "owner-1", "cn"),))


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=SHANGHAI).timestamp() * 1000)


class Car:
    """Writes samples the way a gateway would, one second or minute at a time."""

    def __init__(self, t: int, odo: float = 1000.0, soc: float = 80.0):
        self.t, self.odo, self.soc, self.seq = t, odo, soc, 0
        self.samples: list[dict] = []

    def sample(self, gear="PARK", speed=0.0, charging=False, power=None, mode=None):
        self.seq += 1
        self.samples.append(
            {
                "event_time_ms": self.t,
                "seq": self.seq,
                "speed": speed,
                "odometer": round(self.odo, 3),
                "soc": round(self.soc, 3),
                "latitude": 31.2,
                "longitude": 121.4,
                "gear": gear,
                "is_charging": charging,
                "charge_power": power,
                "charge_mode": mode,
                "outside_temperature": 10.0,
            }
        )

    def park(self, seconds: int, every: int = 60, drain_per_hour: float = 0.02):
        for _ in range(seconds // every):
            self.sample()
            self.t += every * 1000
            self.soc -= drain_per_hour * every / 3600

    def drive(self, seconds: int, kmh: float = 36.0, use_per_km: float = 0.25):
        for _ in range(seconds):
            self.sample("DRIVE", kmh)
            self.t += 1000
            self.odo += kmh / 3600
            self.soc -= kmh / 3600 * use_per_km

    def charge(self, seconds: int, kw: float = 11.0, every: int = 10, capacity: float = 60.0):
        for _ in range(seconds // every):
            self.sample(charging=True, power=kw, mode="AC")
            self.t += every * 1000
            self.soc += kw * every / 3600 / capacity * 100

    def gap(self, seconds: int, km: float = 0.0):
        self.t += seconds * 1000
        self.odo += km


def run(samples, upload_size=10, shuffle_seed=None, config=CFG):
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    uploads = [samples[i : i + upload_size] for i in range(0, len(samples), upload_size)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(uploads)
    records = []
    for i, chunk in enumerate(uploads):
        ingest(state, {"upload_id": f"u{i}", "samples": chunk}, config, REG)
        records += advance(state, config, REG)
    records += flush(state, config, REG)
    return state, records


def final(records, kind):
    return [r for r in records if r["kind"] == kind and r["final"]]


def test_one_trip_between_parks():
    car = Car(at("2026-11-06T08:00:00"))
    car.park(600)
    car.drive(600, kmh=36)
    car.park(900)
    _, records = run(car.samples)
    (trip,) = final(records, "trip")
    assert trip["distance_km"] == pytest.approx(6.0, abs=0.011)
    assert trip["duration_s"] == 599
    assert trip["max_speed_kmh"] == 36 and trip["avg_speed_kmh"] == pytest.approx(36, rel=0.01)
    assert trip["soc_used"] == pytest.approx(6.0 * 0.25, abs=0.01)
    assert trip["energy_kwh"] == pytest.approx(trip["soc_used"] / 100 * 60)
    assert trip["outside_temp_avg"] == 10.0


def test_short_stop_in_park_stays_one_trip_longer_park_splits():
    car = Car(at("2026-11-06T08:00:00"))
    car.drive(300)
    car.park(120)  # shorter than the 5-minute gap
    car.drive(300)
    car.park(600)  # longer: the trip ends
    car.drive(300)
    _, records = run(car.samples)
    trips = final(records, "trip")
    assert len(trips) == 2
    assert trips[0]["distance_km"] == pytest.approx(6.0, abs=0.02)


def test_trip_across_midnight_is_one_trip_split_over_two_days():
    car = Car(at("2026-11-06T23:50:00"))
    car.drive(1200, kmh=60)  # 23:50 -> 00:10 local
    car.park(900)
    _, records = run(car.samples)
    (trip,) = final(records, "trip")
    days = {d["date"]: d for d in final(records, "day")}
    assert set(days) == {"2026-11-06", "2026-11-07"}
    assert days["2026-11-06"]["distance_km"] == pytest.approx(10.0, abs=0.02)
    assert days["2026-11-07"]["distance_km"] == pytest.approx(10.0, abs=0.02)
    # days count every odometer step, the trip runs first to last moving sample
    assert sum(d["distance_km"] for d in days.values()) == pytest.approx(
        trip["distance_km"], abs=0.02
    )
    assert days["2026-11-06"]["trips"] == 1 and days["2026-11-07"]["trips"] == 0


def test_charge_interrupted_and_resumed_is_one_session():
    car = Car(at("2026-11-06T20:00:00"), soc=30.0)
    car.charge(1200)
    car.park(120)  # unplugged briefly
    car.charge(1200)
    car.park(1800)
    car.charge(600)  # much later: a new session
    _, records = run(car.samples)
    charges = final(records, "charge")
    assert len(charges) == 2
    first = charges[0]
    assert first["end_soc"] - first["start_soc"] == pytest.approx(
        2390 / 3600 * 11 / 60 * 100, abs=0.5
    )
    assert first["energy_added_kwh"] == pytest.approx(
        (first["end_soc"] - first["start_soc"]) / 100 * 60
    )
    assert first["peak_power_kw"] == 11.0 and first["mode"] == "AC"
    assert first["energy_metered_kwh"] == pytest.approx(11 * 2390 / 3600, rel=0.01)


def test_parked_for_hours_without_samples_then_driving_starts_a_new_trip():
    car = Car(at("2026-11-06T07:00:00"))
    car.drive(300)
    car.park(60)  # one PARK sample, then the gateway sleeps
    car.gap(5 * 3600)
    car.drive(300)
    _, records = run(car.samples)
    assert len(final(records, "trip")) == 2


def test_gap_in_the_data_while_driving_is_one_trip_if_the_odometer_moved():
    car = Car(at("2026-11-06T07:00:00"))
    car.drive(300)
    car.gap(600, km=9.0)  # a tunnel: 10 minutes, 9 km
    car.drive(300)
    car.park(600)
    _, records = run(car.samples)
    (trip,) = final(records, "trip")
    assert trip["distance_km"] == pytest.approx(9.0 + 6.0, abs=0.05)


def test_gap_with_no_odometer_progress_splits_the_trip():
    car = Car(at("2026-11-06T07:00:00"))
    car.drive(300)
    car.gap(600, km=0.0)
    car.drive(300)
    car.park(600)
    _, records = run(car.samples)
    assert len(final(records, "trip")) == 2


def test_out_of_order_uploads_within_lateness_give_the_same_result():
    car = Car(at("2026-11-06T07:00:00"))
    for _ in range(3):
        car.park(900)
        car.drive(900)
    car.park(900)
    late_ok = SessionConfig(allowed_lateness_ms=1_800_000)  # the swaps below reach 20 minutes back
    _, in_order = run(car.samples, upload_size=10, config=late_ok)
    # shuffle within windows shorter than the allowed lateness: swap neighbours
    chunks = [car.samples[i : i + 10] for i in range(0, len(car.samples), 10)]
    for i in range(0, len(chunks) - 1, 2):
        chunks[i], chunks[i + 1] = chunks[i + 1], chunks[i]
    _, swapped = run([s for c in chunks for s in c], upload_size=10, config=late_ok)

    def strip(records):
        return [{k: v for k, v in r.items() if k != "version"} for r in final(records, "trip")]

    assert strip(swapped) == strip(in_order) and len(strip(in_order)) == 3


def test_clock_jumping_back_past_what_was_released_is_too_late():
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    car = Car(at("2026-11-06T07:00:00"))
    car.drive(600)
    ingest(state, {"upload_id": "a", "samples": car.samples}, CFG, REG)
    advance(state, CFG, REG)  # releases up to newest - 2 minutes
    old = dict(car.samples[10], seq=10_000)
    result = ingest(
        state,
        {
            "upload_id": "b",
            "samples": [old, dict(car.samples[-1], seq=10_001, event_time_ms=car.t)],
        },
        CFG,
        REG,
    )
    assert result.too_late == [10_000] and result.accepted == 1


def test_a_replayed_upload_is_ignored():
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    car = Car(at("2026-11-06T07:00:00"))
    car.drive(60)
    first = ingest(state, {"upload_id": "a", "samples": car.samples}, CFG, REG)
    again = ingest(state, {"upload_id": "a", "samples": car.samples}, CFG, REG)
    assert first.accepted == 60 and again.duplicate_upload and again.accepted == 0


def test_open_trip_is_provisional_until_it_closes_and_then_final_with_a_higher_version():
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    car = Car(at("2026-11-06T07:00:00"))
    car.drive(600)
    ingest(state, {"upload_id": "a", "samples": car.samples}, CFG, REG)
    (open_trip,) = [r for r in advance(state, CFG, REG) if r["kind"] == "open_trip"]
    assert open_trip["active"] and open_trip["final"] is False
    assert open_trip["distance_km"] == pytest.approx(6.0, abs=0.02)
    car.samples.clear()
    car.park(1200)
    ingest(state, {"upload_id": "b", "samples": car.samples}, CFG, REG)
    records = advance(state, CFG, REG)
    (closed,) = [r for r in records if r["kind"] == "trip"]
    (slot,) = [r for r in records if r["kind"] == "open_trip"]
    assert closed["final"] and closed["version"] > open_trip["version"]
    assert closed["start_ms"] == open_trip["start_ms"]
    assert slot["active"] is False and slot["version"] == closed["version"]


def test_daily_totals_include_idle_drain_and_charging():
    car = Car(at("2026-11-06T00:00:00"), soc=50.0)
    car.park(3600 * 4, drain_per_hour=0.1)
    car.charge(3600)
    car.drive(1800, kmh=50)
    car.park(3600 * 19 + 60)  # into the next day
    _, records = run(car.samples)
    day = next(d for d in final(records, "day") if d["date"] == "2026-11-06")
    parked_evening_h = 24 - 5.5  # parked from 05:30 until midnight at the default 0.02 %/h
    assert day["idle_drain_kwh"] == pytest.approx(
        (0.1 * 4 + 0.02 * parked_evening_h) / 100 * 60, rel=0.05
    )
    assert day["energy_charged_kwh"] == pytest.approx(11.0, rel=0.02)
    assert day["distance_km"] == pytest.approx(25.0, abs=0.05)
    assert day["driving_s"] == pytest.approx(1799)
    # 0.25 % of 60 kWh per km = 150 Wh/km
    assert day["efficiency_wh_per_km"] == pytest.approx(150, rel=0.01)
    assert day["trips"] == 1 and day["charges"] == 1


def test_a_message_at_or_below_the_applied_offset_is_a_replay():
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    car = Car(at("2026-11-06T07:00:00"))
    car.drive(20)
    first, second = car.samples[:10], car.samples[10:]
    assert ingest(state, {"upload_id": "a", "samples": first}, CFG, REG, ("t:0", 5)).accepted == 10
    assert ingest(state, {"upload_id": "b", "samples": second}, CFG, REG, ("t:0", 9)).accepted == 10
    replay = ingest(state, {"upload_id": "a", "samples": first}, CFG, REG, ("t:0", 5))
    assert replay.duplicate_upload and replay.too_late == []

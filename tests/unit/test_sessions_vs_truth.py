"""The pure sessionisation against the simulator's ground truth (no broker)."""

import random

import pytest

from producers.publish import DEFAULT_START_MS
from producers.simulator import build_fleet, new_truth, simulate
from stream_jobs.sessions import SessionConfig, advance, flush, ingest, new_state

CONFIG = SessionConfig()


def aggregate(uploads, fleet, config=CONFIG):
    states = {v.vin: new_state(v.vin, v.region, v.time_zone, v.battery_capacity_kwh) for v in fleet}
    registry = {v.vin: v.registration_in(v.region) for v in fleet}
    latest: dict[tuple, dict] = {}
    late = 0

    def keep(records):
        for r in records:
            slot = r["kind"].startswith("open_")
            key = (r["vin"], r["kind"], None if slot else r.get("start_ms") or r.get("date"))
            if key not in latest or r["version"] >= latest[key]["version"]:
                latest[key] = r

    for upload in uploads:
        registration = registry[upload["vin"]]
        late += len(ingest(states[upload["vin"]], upload, config, registration).too_late)
        keep(advance(states[upload["vin"]], config, registration))
    for vin, state in states.items():
        keep(flush(state, config, registry[vin]))
    return latest, late


def compare(latest, truth):
    errors = {"distance": 0.0, "energy": 0.0, "trips": 0}
    for vin, t in truth.vehicles.items():
        trips = sorted(
            (r for (v, k, _), r in latest.items() if v == vin and k == "trip"),
            key=lambda r: r["start_ms"],
        )
        charges = sorted(
            (r for (v, k, _), r in latest.items() if v == vin and k == "charge"),
            key=lambda r: r["start_ms"],
        )
        assert len(trips) == len(t.trips) and len(charges) == len(t.charges), vin
        for got, want in zip(trips, t.trips, strict=True):
            errors["trips"] += 1
            assert (
                abs(got["start_ms"] - want.start_ms) <= 1000
                and abs(got["end_ms"] - want.end_ms) <= 1000
            )
            assert got["distance_km"] == pytest.approx(want.distance_km, rel=0.005, abs=0.01)
            assert got["energy_kwh"] == pytest.approx(want.energy_kwh, rel=0.02, abs=0.05)
        for got, want in zip(charges, t.charges, strict=True):
            assert (
                abs(got["start_ms"] - want.start_ms) <= 10_000
                and abs(got["end_ms"] - want.end_ms) <= 10_000
            )
            assert got["energy_added_kwh"] == pytest.approx(want.energy_kwh, rel=0.02, abs=0.05)
            assert got["mode"] == want.mode and got["peak_power_kw"] == pytest.approx(
                want.peak_power_kw
            )
        days = {r["date"]: r for (v, k, _), r in latest.items() if v == vin and k == "day"}
        for date, want in t.daily().items():
            got = days[date]
            assert got["distance_km"] == pytest.approx(
                want.get("distance_km", 0), rel=0.005, abs=0.05
            )
            for key in ("energy_used_kwh", "energy_charged_kwh", "idle_drain_kwh"):
                assert got[key] == pytest.approx(want.get(key, 0), rel=0.02, abs=0.05), (
                    vin,
                    date,
                    key,
                )
            assert (got["trips"], got["charges"]) == (want.get("trips", 0), want.get("charges", 0))
    return errors


def run_fleet(seed, hours=14.0):
    fleet = build_fleet(seed, owners=6, vehicles=10)
    truth = new_truth(fleet)
    uploads = list(
        simulate(fleet, seed=seed, start_ms=DEFAULT_START_MS, duration_s=hours * 3600, truth=truth)
    )
    return fleet, truth, uploads


def test_in_order_delivery_matches_the_ground_truth_across_midnight():
    fleet, truth, uploads = run_fleet(21)
    latest, late = aggregate(uploads, fleet)
    assert late == 0
    assert compare(latest, truth)["trips"] >= 20
    assert any(len(t.daily()) >= 2 for t in truth.vehicles.values())  # crossed a local midnight


def test_shuffled_delivery_within_the_lateness_and_duplicates_match_too():
    fleet, truth, uploads = run_fleet(22)
    rng = random.Random(5)
    # Each vehicle's uploads arrive out of order within a 90 s window (lateness is 120 s),
    # and one in ten arrives twice (a replay).
    copies = uploads + rng.sample(uploads, len(uploads) // 10)
    jittered = sorted(copies, key=lambda u: u["sent_at_ms"] + rng.uniform(0, 90_000))
    latest, late = aggregate(jittered, fleet)
    assert late == 0
    compare(latest, truth)

import hashlib
import json
from collections import Counter, defaultdict

import pytest

from producers.simulator import build_fleet, new_truth, simulate, vin_check_digit
from schemas import default_store
from schemas.registry import VIN_PATTERN
from schemas.signals import sample_problems, sample_signals

START = 1_793_944_800_000


def run(seed=7, owners=30, vehicles=50, minutes=10.0):
    fleet = build_fleet(seed, owners=owners, vehicles=vehicles)
    truth = new_truth(fleet)
    uploads = list(simulate(fleet, seed=seed, start_ms=START, duration_s=minutes * 60, truth=truth))
    return fleet, uploads, truth


def digest(uploads):
    return hashlib.sha256(json.dumps(uploads, sort_keys=True).encode()).hexdigest()


def test_same_seed_same_data_other_seed_other_data():
    _, a, ta = run(seed=3, minutes=5)
    _, b, tb = run(seed=3, minutes=5)
    _, c, _ = run(seed=4, minutes=5)
    assert digest(a) == digest(b) and ta.totals() == tb.totals()
    assert digest(a) != digest(c)


def test_a_vehicles_data_does_not_depend_on_the_rest_of_the_fleet():
    fleet = build_fleet(3)
    alone = list(simulate(fleet[:1], seed=3, start_ms=START, duration_s=300))
    together = [
        u
        for u in simulate(fleet, seed=3, start_ms=START, duration_s=300)
        if u["vin"] == fleet[0].vin
    ]
    assert digest(alone) == digest(together)


def test_fleet_shape():
    fleet = build_fleet(7, owners=30, vehicles=50)
    assert len(fleet) == 50
    per_owner = Counter(v.owner_id for v in fleet)
    assert len(per_owner) == 30 and set(per_owner.values()) <= {1, 2, 3}
    assert {v.region for v in fleet} == {"cn", "eu"}
    for owner in per_owner:
        assert len({v.region for v in fleet if v.owner_id == owner}) == 1
    assert len({v.vin for v in fleet}) == 50
    for v in fleet:
        assert VIN_PATTERN.match(v.vin) and vin_check_digit(v.vin) == v.vin[8]


@pytest.mark.parametrize(("owners", "vehicles"), [(30, 29), (10, 31), (1, 1)])
def test_impossible_fleets_are_refused(owners, vehicles):
    with pytest.raises(ValueError, match="cannot"):
        build_fleet(1, owners=owners, vehicles=vehicles, regions=("cn", "eu"))


def test_every_upload_fits_the_schema_and_its_ranges():
    _, uploads, _ = run(minutes=10)
    store = default_store()
    v1 = store.get("VehicleUpload", 1)
    signals = sample_signals(v1)
    for u in uploads:
        store.encode(u, v1)
        assert 1 <= len(u["samples"]) <= 60
        for s in u["samples"]:
            assert sample_problems(s, signals) == []
            assert s["event_time_ms"] <= u["sent_at_ms"]


def test_order_and_monotonic_counters():
    _, uploads, _ = run(minutes=10)
    sent = [u["sent_at_ms"] for u in uploads]
    assert sent == sorted(sent)
    last = defaultdict(lambda: (-1, -1.0, -1))
    for u in uploads:
        for s in u["samples"]:
            seq, odo, t = last[u["vin"]]
            assert s["seq"] > seq and s["odometer"] >= odo and s["event_time_ms"] > t
            last[u["vin"]] = (s["seq"], s["odometer"], s["event_time_ms"])


def test_truth_counts_what_was_yielded():
    _, uploads, truth = run(minutes=10)
    samples, ups = Counter(), Counter()
    for u in uploads:
        samples[u["vin"]] += len(u["samples"])
        ups[u["vin"]] += 1
    for vin, t in truth.vehicles.items():
        assert (t.samples, t.uploads) == (samples[vin], ups[vin])
    assert truth.totals() == {"uploads": len(uploads), "samples": sum(samples.values())}


def test_a_short_run_shows_driving_charging_and_parking():
    _, uploads, _ = run(minutes=10)
    states = Counter()
    for u in uploads:
        for s in u["samples"]:
            states[
                "charging" if s["is_charging"] else "parked" if s["gear"] == "PARK" else "driving"
            ] += 1
    assert states["driving"] and states["charging"] and states["parked"]


def test_trips_and_charges_add_up():
    _, _, truth = run(minutes=120)
    trips = [t for v in truth.vehicles.values() for t in v.trips]
    charges = [c for v in truth.vehicles.values() for c in v.charges]
    assert len(trips) >= 50 and len(charges) >= 10
    for v in truth.vehicles.values():
        assert sum(t.distance_km for t in v.trips) == pytest.approx(
            v.distance_km, rel=1e-3, abs=1e-6
        )
    assert all(t.end_soc <= t.start_soc and t.energy_kwh >= 0 for t in trips)
    assert all(c.end_soc >= c.start_soc and c.mode in ("AC", "DC") for c in charges)
    assert sum(v.dtcs for v in truth.vehicles.values()) > 0

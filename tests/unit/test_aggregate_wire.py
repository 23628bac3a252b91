"""Aggregate records go on the wire as AggregateRecord (Avro) and come back unchanged;
JSON records from older workers are still read; what is neither is refused by reason."""

from __future__ import annotations

import json

import pytest

from producers.simulator import build_fleet, new_truth, simulate
from schemas.aggregates import decode_aggregate, encode_aggregate
from schemas.codec import FramingError
from stream_jobs.sessions import SessionConfig, advance, flush, ingest, new_state

START_MS = 1_790_000_000_000


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Everything the aggregation emits for a small fleet over three hours."""
    fleet = build_fleet(5, owners=3, vehicles=4, regions=("eu",))
    registrations = {v.vin: v.registration_in("eu") for v in fleet}
    states = {v.vin: new_state(v.vin, "eu", v.time_zone, v.battery_capacity_kwh) for v in fleet}
    config, out = SessionConfig(), []
    truth = new_truth(fleet)
    for upload in simulate(fleet, seed=5, start_ms=START_MS, duration_s=3 * 3600, truth=truth):
        vin = upload["vin"]
        ingest(states[vin], upload, config, registrations[vin])
        out += advance(states[vin], config, registrations[vin])
    for vin, state in states.items():
        out += flush(state, config, registrations[vin])
    return out


def test_every_kind_comes_back_as_it_was_emitted(records):
    kinds = {r["kind"] for r in records}
    assert kinds == {"trip", "charge", "day", "open_trip", "open_charge"}
    assert any(r["kind"].startswith("open_") and not r["active"] for r in records)
    for record in records:
        back = decode_aggregate(encode_aggregate(record))
        assert back == record and list(back) == list(record)  # same keys, same order


def test_the_wire_form_is_smaller_than_the_json_it_replaces(records):
    avro = sum(len(encode_aggregate(r)) for r in records)
    assert avro < 0.5 * sum(len(json.dumps(r).encode()) for r in records)


def test_json_from_an_older_worker_is_still_read_and_junk_is_refused(records):
    assert decode_aggregate(json.dumps(records[0]).encode()) == records[0]
    for junk, reason in [
        (b"{not json", "malformed_json"),
        (b"[1, 2]", "not_single_object"),
        (b"\xc3\x01" + b"\x00" * 8, "unknown_schema"),
        (encode_aggregate(records[0])[:-3], "malformed_avro"),
    ]:
        with pytest.raises(FramingError) as refused:
            decode_aggregate(junk)
        assert refused.value.reason == reason


def test_a_record_that_does_not_fit_the_schema_raises_at_the_worker(records):
    trip = next(r for r in records if r["kind"] == "trip")
    with pytest.raises(KeyError):
        encode_aggregate({k: v for k, v in trip.items() if k != "distance_km"})
    with pytest.raises((ValueError, TypeError)):
        encode_aggregate({**trip, "distance_km": "far"})

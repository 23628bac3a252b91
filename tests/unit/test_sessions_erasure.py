"""An owner's erasure reaching a vehicle's session state: nothing of the owner's erased
time stays in it or comes back into it; the owner's new data and other owners' data do."""

from stream_jobs.session_state import to_json
from stream_jobs.sessions import advance, flush, forget_owner, ingest, new_state
from tests.unit.test_sessions import CFG, Car, at
from tests.unit.test_sessions_ownership import feed, registration

START = at("2026-11-06T07:00:00")


def state_text(state) -> str:
    """What the changelog would hold."""
    return to_json(state).decode()


def test_an_erased_owner_leaves_nothing_in_the_state_and_later_data_starts_afresh():
    reg = registration((0, "owner-1", "cn"))
    car = Car(START)
    car.drive(10 * 60)  # mid-trip when the owner erases
    car.samples[-1]["latitude"] = 31.987654  # a position to look for
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    feed(state, car.samples, reg)
    assert state.trip is not None and state.buffer and "31.987654" in state_text(state)

    horizon = car.t
    assert forget_owner(state, "owner-1", horizon, reg)
    assert state.trip is None and state.charge is None and state.days == {}
    assert state.last is None and state.buffer == [] and state.owner_id is None
    assert "31.987654" not in state_text(state)
    assert advance(state, CFG, reg) == []  # nothing of the owner is emitted again

    # the owner's new data after the erasure is aggregated from nothing
    car.gap(60)
    first_new = car.t
    car.drive(5 * 60)
    car.park(10 * 60)
    new = car.samples[-(5 * 60 + 10) :]
    records = []
    for i in range(0, len(new), 10):
        ingest(state, {"upload_id": f"new-{i}", "samples": new[i : i + 10]}, CFG, reg)
        records += advance(state, CFG, reg)
    records += flush(state, CFG, reg)
    trips = [r for r in records if r["kind"] == "trip" and r["final"]]
    assert [t["start_ms"] for t in trips] == [first_new]
    assert all(r["owner_id"] == "owner-1" for r in records)


def test_a_replayed_or_delayed_sample_of_the_erased_time_is_not_taken_in_again():
    reg = registration((0, "owner-1", "cn"))
    car = Car(START)
    car.drive(5 * 60)
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    horizon = car.t + 60_000
    forget_owner(state, "owner-1", horizon, reg)
    before = {"upload_id": "old", "samples": car.samples[:10]}
    got = ingest(state, before, CFG, reg, received_ms=horizon + 5000)
    assert got.accepted == 0 and got.too_late == []  # skipped, not dead-lettered with its bytes
    # stamped after the horizon but received before it: in the pipeline when the owner erased
    car.gap(120)
    ahead = {
        "upload_id": "ahead",
        "samples": [dict(car.samples[-1], event_time_ms=car.t, seq=9999)],
    }
    assert ingest(state, ahead, CFG, reg, received_ms=horizon - 1).accepted == 0
    assert (
        ingest(state, dict(ahead, upload_id="later"), CFG, reg, received_ms=horizon + 1).accepted
        == 1
    )


def test_the_next_owner_keeps_their_data_when_the_seller_erases():
    sale = START + 5 * 60_000 + 500
    reg = registration((0, "seller", "cn"), (sale, "buyer", "cn"))
    car = Car(START)
    car.drive(10 * 60)
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    feed(state, car.samples, reg)
    buffered = len(state.buffer)
    assert state.owner_id == "buyer" and state.trip is not None

    assert not forget_owner(state, "seller", sale, reg)  # nothing of the seller was left
    assert state.owner_id == "buyer" and state.trip is not None
    assert len(state.buffer) == buffered
    records = flush(state, CFG, reg)
    assert [r["owner_id"] for r in records if r["kind"] == "trip"] == ["buyer"]


def test_a_state_remembers_a_bounded_number_of_erasures():
    reg = registration((0, "owner-1", "cn"))
    state = new_state("VIN", "cn", "Asia/Shanghai", 60.0)
    for i in range(20):
        forget_owner(state, f"owner-{i}", START + i, reg)
    assert len(state.erased) == 8 and "owner-19" in state.erased

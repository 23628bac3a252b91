from schemas import default_store
from stream_jobs.registry import decode_registration, encode_registration
from stream_jobs.validate import (
    DeadLettered,
    Limits,
    Quarantined,
    RawUpload,
    Registration,
    Routed,
    SeenUploads,
    route_batch,
    route_upload,
)

STORE = default_store()
V1 = STORE.get("VehicleUpload", 1)
VIN = "LRW3E7EK4NC000001"
EU_VIN = "WVWZZZ1KZAW000002"
NOW = 1_800_000_000_000
LIMITS = Limits(max_clock_skew_ms=300_000, max_backlog_ms=7 * 86_400_000, regions=("cn", "eu"))
REGISTRY = {
    VIN: Registration(VIN, "owner-1", "cn"),
    EU_VIN: Registration(EU_VIN, "owner-2", "eu"),
    "LRW3E7EK4NC000009": Registration("LRW3E7EK4NC000009", "owner-3", "us"),
}


def upload(vin=VIN, upload_id="u-1", sent=NOW, samples=None, **sample):
    base = {"event_time_ms": sent - 1000, "seq": 1, "speed": 10.0}
    base.update(sample)
    return {
        "vin": vin,
        "upload_id": upload_id,
        "sent_at_ms": sent,
        "gateway_firmware": "1",
        "samples": samples if samples is not None else [base],
    }


def raw(record=None, offset=0, partition=0, key=None, value=None, received=NOW):
    record = record or upload()
    return RawUpload(
        value=value if value is not None else STORE.encode(record, V1),
        key=key if key is not None else record["vin"].encode(),
        partition=partition,
        offset=offset,
        timestamp_ms=received,
    )


def route(r, seen=None):
    return route_upload(r, STORE, REGISTRY, seen or SeenUploads(), LIMITS)


def test_routes_to_the_registered_region_with_the_owner():
    assert route(raw()) == Routed("cn", "owner-1", VIN, "u-1", 1)
    assert route(raw(upload(vin=EU_VIN))).region == "eu"


def test_unknown_vin_and_unknown_region_are_quarantined():
    out = route(raw(upload(vin="LRW3E7EK4NC000777")))
    assert isinstance(out, Quarantined) and out.reason == "unknown_vin"
    out = route(raw(upload(vin="LRW3E7EK4NC000009")))
    assert isinstance(out, Quarantined) and out.reason == "unknown_region"


def reason(r):
    out = route(r)
    assert isinstance(out, DeadLettered), out
    return out.reason


def test_dead_letter_reasons():
    assert reason(raw(value=b"\x00garbage")) == "not_single_object"
    assert reason(raw(value=STORE.encode(upload(), V1)[:20])) == "malformed_avro"
    assert reason(raw(upload(vin="NOT-A-VIN"), key=b"NOT-A-VIN")) == "invalid_vin"
    assert reason(raw(upload(samples=[]))) == "empty_upload"
    assert reason(raw(upload(speed=500.0))) == "invalid_sample"
    assert reason(raw(upload(sent=NOW + 3_600_000))) == "clock_skew"
    assert reason(raw(upload(event_time_ms=NOW + 3_600_000))) == "clock_skew"
    assert reason(raw(upload(event_time_ms=NOW - 8 * 86_400_000))) == "too_old"
    assert reason(raw(key=b"SOMEOTHERVIN00000")) == "key_mismatch"
    reg = STORE.encode(
        {"vin": VIN, "owner_id": "o", "region": "cn"}, STORE.get("VehicleRegistration")
    )
    assert reason(raw(value=reg)) == "unexpected_schema"


def test_sequence_must_increase_within_an_upload():
    samples = [{"event_time_ms": NOW - 2000, "seq": 5}, {"event_time_ms": NOW - 1000, "seq": 5}]
    assert reason(raw(upload(samples=samples))) == "invalid_sample"


def test_old_uploads_sent_late_are_accepted():
    # store-and-forward: a vehicle offline for a day uploads yesterday's samples now
    day = 86_400_000
    assert isinstance(route(raw(upload(sent=NOW - day), received=NOW)), Routed)


def test_resend_is_a_duplicate_but_a_replay_of_the_same_message_is_not():
    seen = SeenUploads()
    first = raw(offset=10)
    assert isinstance(route(first, seen), Routed)
    assert isinstance(route(first, seen), Routed)  # worker restarted, same message again
    resend = raw(offset=11)
    out = route(resend, seen)
    assert isinstance(out, DeadLettered) and out.reason == "duplicate_upload"
    assert "0:10" in out.detail


def test_duplicates_in_one_batch_and_from_stored_history():
    stored = {VIN: {"u-old": "3:7"}}
    seen = SeenUploads(load=lambda vin: stored.get(vin, {}))
    outcomes = route_batch(
        [raw(offset=1), raw(offset=2), raw(upload(upload_id="u-old"), offset=3)],
        STORE, REGISTRY, seen, LIMITS,
    )  # fmt: skip
    assert [type(o).__name__ for o in outcomes] == ["Routed", "DeadLettered", "DeadLettered"]
    assert seen.changed == {VIN}
    assert set(seen.by_vin[VIN]) == {"u-old", "u-1"}


def test_seen_history_is_bounded_per_vehicle():
    seen = SeenUploads()
    for i in range(100):
        seen.remember(VIN, f"u-{i}", f"0:{i}", keep=64)
    assert len(seen.by_vin[VIN]) == 64
    assert "u-0" not in seen.by_vin[VIN] and "u-99" in seen.by_vin[VIN]


def test_registration_round_trip_lowercases_region():
    data = encode_registration(
        {"vin": VIN, "owner_id": "owner-1", "region": "CN", "model": "M",
         "battery_capacity_kwh": 75.0, "time_zone": "Asia/Shanghai"}
    )  # fmt: skip
    reg = decode_registration(data)
    assert reg.region == "cn" and reg.owner_id == "owner-1" and reg.battery_capacity_kwh == 75.0

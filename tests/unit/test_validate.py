from schemas import default_store
from schemas.registry import Period, Registration
from stream_jobs.validate import (
    DeadLettered,
    Limits,
    Quarantined,
    RawUpload,
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
LIMITS = Limits(max_clock_skew_ms=300_000, max_backlog_ms=7 * 86_400_000, region="cn")
MOVED_VIN, SOLD_VIN, GONE_VIN = "LRW3E7EK4NC000003", "LRW3E7EK4NC000004", "LRW3E7EK4NC000005"
LATER = "LRW3E7EK4NC000006"


def registered(vin, *periods, revision=1):
    return Registration(vin, tuple(Period(*p) for p in periods), revision=revision)


REGISTRY = {
    VIN: registered(VIN, (0, "owner-1", "cn")),
    # the EU registry's owners are not in the CN registry: only that it is elsewhere
    EU_VIN: registered(EU_VIN, (0, None, "eu")),
    MOVED_VIN: registered(MOVED_VIN, (0, "owner-3", "cn"), (NOW - 10_000, None, "eu"), revision=2),
    SOLD_VIN: registered(
        SOLD_VIN, (0, "owner-4", "cn"), (NOW - 10_000, "owner-5", "cn"), revision=7
    ),
    GONE_VIN: registered(GONE_VIN, (0, "owner-6", "cn"), (NOW - 10_000, None, None)),
    LATER: registered(LATER, (NOW + 60_000, "owner-7", "cn")),
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


def test_routes_within_the_region_with_the_registry_revision_it_decided_with():
    assert route(raw()) == Routed("cn", VIN, "u-1", 1, 1)
    sold = route(raw(upload(vin=SOLD_VIN)))  # both owners are registered here
    assert sold == Routed("cn", SOLD_VIN, "u-1", 1, 7)


def quarantined(r):
    out = route(r)
    assert isinstance(out, Quarantined), out
    return out.reason


def test_a_vehicle_not_registered_here_at_its_samples_times_is_quarantined_never_forwarded():
    assert quarantined(raw(upload(vin="LRW3E7EK4NC000777"))) == "unknown_vin"
    assert quarantined(raw(upload(vin=EU_VIN))) == "registered_elsewhere"
    assert quarantined(raw(upload(vin=MOVED_VIN))) == "registered_elsewhere"  # after the move
    assert quarantined(raw(upload(vin=GONE_VIN))) == "deregistered"
    assert quarantined(raw(upload(vin=LATER))) == "not_registered_yet"
    # before the move it was this region's: routed, though it is sent after the move
    before = upload(vin=MOVED_VIN, event_time_ms=NOW - 20_000)
    assert isinstance(route(raw(before)), Routed)


def test_an_upload_with_some_samples_registered_here_is_routed_for_the_sink_to_split():
    samples = [{"event_time_ms": NOW - 20_000, "seq": 1}, {"event_time_ms": NOW - 1_000, "seq": 2}]
    assert isinstance(route(raw(upload(vin=GONE_VIN, samples=samples))), Routed)


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
    unkeyed = RawUpload(STORE.encode(upload(), V1), None, 0, 0, NOW)
    assert reason(unkeyed) == "missing_key"
    reg = STORE.encode(
        {"vin": VIN, "owner_id": "o", "region": "cn"}, STORE.get("VehicleRegistration", 1)
    )
    assert reason(raw(value=reg)) == "unexpected_schema"


def test_clock_skew_is_measured_against_the_broker_receive_time_not_the_gateways_clock():
    # a gateway a day ahead: its own sent_at agrees with its samples, the broker's does not
    ahead = upload(sent=NOW + 86_400_000, event_time_ms=NOW + 86_400_000 - 1000)
    assert reason(raw(ahead, received=NOW)) == "clock_skew"


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
        STORE,
        REGISTRY,
        seen,
        LIMITS,
    )
    assert [type(o).__name__ for o in outcomes] == ["Routed", "DeadLettered", "DeadLettered"]
    assert seen.changed == {VIN}
    assert set(seen.by_vin[VIN]) == {"u-old", "u-1"}


def test_seen_history_is_bounded_per_vehicle():
    seen = SeenUploads()
    for i in range(100):
        seen.remember(VIN, f"u-{i}", f"0:{i}", keep=64)
    assert len(seen.by_vin[VIN]) == 64
    assert "u-0" not in seen.by_vin[VIN] and "u-99" in seen.by_vin[VIN]


def test_weight_and_size_limits_are_dead_letter_reasons():
    small = Limits(300_000, 7 * 86_400_000, "cn", max_upload_bytes=4096, max_samples=10)
    heavy = upload(samples=[{"event_time_ms": NOW - 100_000 + i, "seq": i} for i in range(11)])
    out = route_upload(raw(heavy), STORE, REGISTRY, SeenUploads(), small)
    assert (out.reason, out.detail) == (
        "too_many_samples",
        "11 samples; an upload holds at most 10",
    )
    big = RawUpload(b"\xc3\x01" + bytes(5000), VIN.encode(), 0, 0, NOW)
    assert route_upload(big, STORE, REGISTRY, SeenUploads(), small).reason == "too_large"
    assert reason(raw(upload(upload_id="u" * 200))) == "invalid_field"
    assert reason(raw(upload(upload_id=""))) == "invalid_field"
    for odd in (float("nan"), float("inf"), -float("inf"), 1e308):
        assert reason(raw(upload(speed=odd))) == "invalid_sample", odd


def test_a_dead_letter_keeps_what_fits_and_says_how_much_there_was():
    from vtp.core.headers import KEEP_BYTES, TRUNCATED, kept

    assert kept(b"abc", 10) == (b"abc", [])
    value, more = kept(b"x" * (KEEP_BYTES * 3), KEEP_BYTES * 2)
    assert len(value) == KEEP_BYTES and more == [(TRUNCATED, str(KEEP_BYTES * 3).encode())]

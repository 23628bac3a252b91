import pytest

from schemas import FramingError, default_store
from schemas.codec import MARKER
from schemas.signals import sample_problems, sample_signals

STORE = default_store()
V1 = STORE.get("VehicleUpload", 1)
V2 = STORE.get("VehicleUpload", 2)


def upload(**sample):
    base = {"event_time_ms": 1_000, "seq": 1, "speed": 10.0, "gear": "DRIVE"}
    base.update(sample)
    return {
        "vin": "LRW3E7EK4NC000001",
        "upload_id": "u-1",
        "sent_at_ms": 2_000,
        "gateway_firmware": "3.2.1",
        "samples": [base],
    }


def test_single_object_frame_carries_crc64_fingerprint():
    data = STORE.encode(upload(), V1)
    assert data[:2] == MARKER
    assert data[2:10] == V1.fingerprint
    assert V1.fingerprint != V2.fingerprint


def test_crc64_avro_matches_the_spec_test_vector():
    # Avro's reference: the schema "null" has fingerprint 7195948357588979594.
    # Through a record we can only check our byte order on a known value:
    import fastavro.schema

    from schemas.codec import Schema

    assert bytes.fromhex(fastavro.schema.fingerprint('"null"', "CRC-64-AVRO")) == (
        7195948357588979594
    ).to_bytes(8, "little")
    assert isinstance(
        Schema.from_definition({"type": "record", "name": "X", "fields": []}).fingerprint, bytes
    )


def test_round_trip_keeps_values():
    record, writer = STORE.decode(STORE.encode(upload(soc=55.5, dtcs=["P0A80"]), V1))
    assert writer.version == 1
    assert record["samples"][0]["soc"] == 55.5
    assert record["samples"][0]["dtcs"] == ["P0A80"]


def test_v1_data_read_by_v2_reader_gets_the_default():
    record, _ = STORE.decode(STORE.encode(upload(), V1), reader=V2)
    assert record["samples"][0]["cabin_temperature"] is None


def test_v2_data_read_by_v1_reader_drops_the_new_field():
    record, writer = STORE.decode(STORE.encode(upload(cabin_temperature=21.5), V2), reader=V1)
    assert writer.version == 2
    assert "cabin_temperature" not in record["samples"][0]
    assert record["samples"][0]["speed"] == 10.0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not_single_object"),
        (b"hello world, not avro", "not_single_object"),
        (MARKER + bytes(8) + b"\x02", "unknown_schema"),
    ],
)
def test_framing_errors_have_reason_codes(data, reason):
    with pytest.raises(FramingError) as err:
        STORE.decode(data)
    assert err.value.reason == reason


def test_truncated_and_padded_bodies_are_malformed():
    data = STORE.encode(upload(), V1)
    for broken in (data[:-5], data[:12], data + b"\x00\x00"):
        with pytest.raises(FramingError) as err:
            STORE.decode(broken)
        assert err.value.reason == "malformed_avro"


def test_signals_carry_vss_names_and_units():
    signals = sample_signals(V1)
    assert signals["speed"].vss == "Vehicle.Speed" and signals["speed"].unit == "km/h"
    assert signals["soc"].vss == "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
    assert signals["latitude"].minimum == -90 and signals["latitude"].maximum == 90
    assert signals["gear"].symbols == ("PARK", "REVERSE", "NEUTRAL", "DRIVE")


@pytest.mark.parametrize(
    ("sample", "fragment"),
    [
        ({"speed": 401.0}, "outside"),
        ({"speed": float("nan")}, "outside"),
        ({"latitude": -91.0}, "outside"),
        ({"soc": "full"}, "must be a number"),
        ({"speed": True}, "must be a number"),
        ({"gear": "TURBO"}, "must be one of"),
        ({"is_charging": 1}, "must be a boolean"),
        ({"warp_factor": 9}, "unknown signal"),
        ({"dtcs": [""]}, "list of codes"),
        ({"seq": -1}, "seq must be"),
        ({"event_time_ms": "now"}, "event_time_ms must be"),
    ],
)
def test_sample_problems_name_the_problem(sample, fragment):
    full = {"event_time_ms": 1, "seq": 1, **sample}
    problems = sample_problems(full, sample_signals(V1))
    assert problems and fragment in problems[0]


def test_valid_sample_has_no_problems():
    sample = upload(soc=0.0, speed=0.0, charge_mode="DC", dtcs=["U0100"])["samples"][0]
    assert sample_problems(sample, sample_signals(V1)) == []

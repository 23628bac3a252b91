"""The SDK's call-site checks; nothing here reaches a broker (nothing is sent)."""

import pytest

from producers.sdk import InvalidSample, TelemetryPublisher

VIN = "LRW3E7EK4NC000001"


@pytest.fixture
def publisher():
    # An unroutable address: these tests only exercise what happens before sending.
    return TelemetryPublisher("127.0.0.1:9", "t", max_samples=1000)


def test_valid_samples_are_buffered(publisher):
    publisher.add_sample(VIN, {"event_time_ms": 1, "seq": 1, "speed": 3.5, "gear": "DRIVE"})
    publisher.add_sample(VIN, {"event_time_ms": 2, "seq": 2, "soc": 50.0})
    assert len(publisher._buffers[VIN]) == 2


@pytest.mark.parametrize(
    ("vin", "sample", "fragment"),
    [
        ("SHORT", {"event_time_ms": 1, "seq": 1}, "17-character VIN"),
        ("LRW3E7EK4NC00000I", {"event_time_ms": 1, "seq": 1}, "17-character VIN"),
        (VIN, {"event_time_ms": 1, "seq": 1, "speed": -5.0}, "Vehicle.Speed"),
        (VIN, {"event_time_ms": 1, "seq": 1, "soc": 101}, r"outside \[0, 100\]"),
        (VIN, {"event_time_ms": 1, "seq": 1, "speed": "fast"}, "must be a number"),
        (VIN, {"event_time_ms": 1, "seq": 1, "teleport": True}, "unknown signal 'teleport'"),
        (VIN, {"seq": 1}, "event_time_ms must be"),
    ],
)
def test_invalid_samples_are_rejected_at_the_call(publisher, vin, sample, fragment):
    with pytest.raises(InvalidSample, match=fragment):
        publisher.add_sample(vin, sample)
    assert publisher._buffers == {}


def test_sequence_numbers_must_increase_per_vehicle(publisher):
    publisher.add_sample(VIN, {"event_time_ms": 1, "seq": 5})
    with pytest.raises(InvalidSample, match="does not increase"):
        publisher.add_sample(VIN, {"event_time_ms": 2, "seq": 5})
    publisher.add_sample("WVWZZZ1KZAW000002", {"event_time_ms": 2, "seq": 1})  # per vehicle


def test_an_upload_that_does_not_fit_the_schema_is_rejected(publisher):
    with pytest.raises(InvalidSample, match="cannot be encoded"):
        publisher.publish_upload({"vin": VIN, "upload_id": "u", "samples": "nope"})


def test_max_samples_must_be_positive():
    with pytest.raises(ValueError, match="max_samples must be 1 to"):
        TelemetryPublisher("127.0.0.1:9", "t", max_samples=0)


def test_an_upload_heavier_than_the_pipeline_takes_is_refused_at_the_call():
    import pytest

    from producers.sdk import InvalidSample, TelemetryPublisher

    publisher = TelemetryPublisher("127.0.0.1:9", "unused", kafka_extra={"log_level": 0})
    upload = {
        "vin": "LRW3E7EK4NC000001",
        "upload_id": "u",
        "sent_at_ms": 1,
        "gateway_firmware": "f",
        "samples": [{"event_time_ms": i, "seq": i, "dtcs": ["P" * 100] * 10} for i in range(600)],
    }
    with pytest.raises(InvalidSample, match="the pipeline takes at most"):
        publisher.publish_upload(upload)
    with pytest.raises(ValueError, match="max_samples"):
        TelemetryPublisher("127.0.0.1:9", "unused", max_samples=100_000)

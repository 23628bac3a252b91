"""What the edge reads of an upload, its answers, and a vehicle's rate allowance."""

from __future__ import annotations

import pytest

from producers import edge_wire
from producers.edge_wire import EdgeRefusal, TokenBucket, read_head
from schemas import MAX_ID_CHARS, default_store

VIN = "WVWZZZ1JZXW000001"
OTHER = "LSVAU2180N2183301"


def upload(
    vin: str = VIN, upload_id: str = "u-1", samples: int = 2, version: int | None = None
) -> bytes:
    store = default_store()
    schema = store.get("VehicleUpload", version)
    sample = {"event_time_ms": 1_793_944_800_000, "seq": 0, "speed": 10.0}
    return store.encode(
        {
            "vin": vin,
            "upload_id": upload_id,
            "sent_at_ms": 1_793_944_801_000,
            "gateway_firmware": "fw",
            "samples": [{**sample, "seq": i} for i in range(samples)],
        },
        schema,
    )


FINGERPRINTS = default_store().fingerprints("VehicleUpload")


def head(frame: bytes, vin: str = VIN, max_samples: int = 3600) -> edge_wire.UploadHead:
    return read_head(
        frame, FINGERPRINTS, vin=vin, max_samples=max_samples, max_id_chars=MAX_ID_CHARS
    )


def refusal(frame: bytes, **kwargs: object) -> EdgeRefusal:
    with pytest.raises(EdgeRefusal) as caught:
        head(frame, **kwargs)  # type: ignore[arg-type]
    return caught.value


@pytest.mark.parametrize("version", [1, 2])
def test_the_head_of_every_upload_version_is_read(version):
    assert head(upload(samples=5, version=version)) == edge_wire.UploadHead(VIN, "u-1", 5)


def test_both_versions_of_the_upload_schema_are_known():
    assert len(FINGERPRINTS) == 2


def test_an_upload_for_another_vin_is_refused_naming_its_id():
    found = refusal(upload(vin=OTHER, upload_id="u-9"))
    assert (found.reason, found.upload_id) == ("vin_mismatch", "u-9")
    assert OTHER in found.detail and VIN in found.detail


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "not_single_object"),
        (b'{"vin": 1}', "not_single_object"),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x22" + VIN.encode(), "unknown_schema"),
    ],
)
def test_what_is_not_a_framed_upload_is_refused(frame, reason):
    assert refusal(frame).reason == reason


def test_a_truncated_upload_is_malformed():
    frame = upload()
    assert refusal(frame[:12]).reason == "malformed_avro"
    assert refusal(frame[:10] + b"\xff" * 12).reason == "malformed_avro"


def test_a_vin_that_is_not_utf8_is_malformed():
    frame = upload()
    broken = frame[:11] + b"\xff" + frame[12:]
    assert refusal(broken).reason == "malformed_avro"


def test_too_many_samples_are_refused_at_the_edge():
    found = refusal(upload(samples=4), max_samples=3)
    assert (found.reason, found.upload_id) == ("too_many_samples", "u-1")


def test_an_empty_or_long_upload_id_is_refused():
    assert refusal(upload(upload_id="")).reason == "bad_upload_id"
    assert refusal(upload(upload_id="x" * (MAX_ID_CHARS + 1))).reason == "bad_upload_id"


def test_peek_reads_the_id_of_a_held_upload():
    assert edge_wire.peek_upload_id(upload(upload_id="u-7")) == "u-7"


def test_answers_round_trip():
    assert edge_wire.parse_answer(edge_wire.ack_message(["a", "b"])) == edge_wire.Answer(
        "ack", ("a", "b")
    )
    retry = edge_wire.parse_answer(edge_wire.retry_message(["a"], "rate_limited", 0.0101))
    assert (retry.kind, retry.reason, retry.retry_after_s) == ("retry", "rate_limited", 0.011)
    refused = edge_wire.parse_answer(edge_wire.refused_message("a", "vin_mismatch", "d"))
    assert (refused.kind, refused.upload_ids, refused.reason) == ("refused", ("a",), "vin_mismatch")


@pytest.mark.parametrize("text", ["[]", "{}", '{"ack": 1}', "null"])
def test_anything_else_is_not_an_answer(text):
    with pytest.raises(ValueError, match="not an answer"):
        edge_wire.parse_answer(text)


def test_the_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)  # a refusal costs nothing
    assert bucket.take(0.5) == 0.0
    assert not bucket.full(0.5)
    assert bucket.full(2.0)
    assert bucket.take(100.0) == 0.0  # never more than the burst saved up
    assert [bucket.take(100.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take(100.0) > 0

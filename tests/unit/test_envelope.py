import io
import json
from pathlib import Path

import chdb
import fastavro
import pytest

from schemas import FramingError, default_store
from schemas.envelope import BatchedUpload, container_of_blocks, cut, pack, unpack

STORE = default_store()
V1 = STORE.get("VehicleUpload", 1)
V2 = STORE.get("VehicleUpload", 2)
VINS = ["LRW3E7EK4NC000001", "LRW3E7EK4NC000002"]
SOURCE = "vtp.cn.uploads:3"


def record(vin, n, samples=3):
    return {
        "vin": vin,
        "upload_id": f"u-{n}",
        "sent_at_ms": 2_000_000 + n,
        "gateway_firmware": "3.2.1",
        "samples": [
            {"event_time_ms": 1_000_000 + n * 10 + i, "seq": n * 10 + i, "speed": float(i)}
            for i in range(samples)
        ],
    }


def batched(n, writer=V1, vin=None, samples=3):
    rec = record(vin or VINS[n % 2], n, samples)
    return BatchedUpload(STORE.encode(rec, writer), rec["vin"].encode(), 100 + n, 5_000 + n, n % 3)


def test_a_batch_gives_back_each_upload_as_it_was_sent():
    uploads = [batched(n) for n in range(5)]
    value, header = pack(SOURCE, V1, uploads)
    source, back = unpack(value, header, STORE)
    assert source == SOURCE and back == uploads
    assert [STORE.decode(b.value)[0]["upload_id"] for b in back] == [f"u-{n}" for n in range(5)]


def test_any_avro_tool_reads_a_batch_as_a_container_file(tmp_path: Path):
    uploads = [batched(n) for n in range(4)]
    value, _ = pack(SOURCE, V1, uploads)
    assert list(fastavro.reader(io.BytesIO(value))) == [STORE.decode(u.value)[0] for u in uploads]
    path = tmp_path / "batch.avro"
    path.write_bytes(value)
    counted = chdb.query(
        f"SELECT vin, upload_id, length(samples) FROM file('{path}', 'Avro') ORDER BY upload_id",
        "CSV",
    )
    assert str(counted).split() == [f'"{VINS[n % 2]}","u-{n}",3' for n in range(4)]


def test_a_batch_cut_mid_vehicle_keeps_each_vehicles_uploads_in_order():
    uploads = [batched(n, vin=VINS[0], samples=50) for n in range(10)]
    limit = 4 * len(uploads[0].value)
    runs = list(cut(uploads, max_bytes=limit))
    assert len(runs) == 3  # the vehicle's uploads span three batches
    assert all(sum(len(u.value) - 10 for u in run) <= limit for run in runs)
    back = [b for run in runs for b in unpack(*pack(SOURCE, V1, run), STORE)[1]]
    assert [b.offset for b in back] == list(range(100, 110))


def test_uploads_of_two_writer_versions_go_in_separate_batches_in_order():
    writers = [V1, V1, V2, V2, V1]
    uploads = [batched(n, writer=w) for n, w in enumerate(writers)]
    runs = list(cut(uploads))
    assert [[u.offset for u in r] for r in runs] == [[100, 101], [102, 103], [104]]
    for run, writer in zip(runs, [V1, V2, V1], strict=True):
        _, back = unpack(*pack(SOURCE, writer, run), STORE)
        assert back == run
        assert STORE.decode(back[0].value)[1] == writer
        assert next(iter(fastavro.reader(io.BytesIO(pack(SOURCE, writer, run)[0]))))


def test_one_upload_larger_than_a_batch_still_goes_alone():
    uploads = [batched(n, samples=40) for n in range(3)]
    assert [len(r) for r in cut(uploads, max_bytes=10)] == [1, 1, 1]


def resided(header: bytes, **changed) -> bytes:
    """``header`` with some of its sidecar's entries replaced."""
    return json.dumps({**json.loads(header), **changed}).encode()


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda v, h: (v[:-20], h), "malformed_batch"),  # truncated
        (lambda v, h: (b"Obj\x02" + v[4:], h), "malformed_batch"),  # not a container
        (lambda v, h: (v, h.replace(b'"lengths":[', b'"lengths":[1,')), "malformed_batch"),
        (lambda v, h: (v, b"{not json"), "malformed_batch"),
        (lambda v, h: (v, h.replace(b'"keys"', b'"k"')), "malformed_batch"),
        (lambda v, h: (v.replace(V1.fingerprint.hex().encode(), b"00" * 8), h), "unknown_schema"),
        # a sidecar written past the worker, with values of the wrong kind or size
        (lambda v, h: (v, resided(h, received_ms=["x", 1, 2])), "malformed_batch"),
        (lambda v, h: (v, resided(h, received_ms=[1.5e12, 1, 2])), "malformed_batch"),
        (lambda v, h: (v, resided(h, received_ms=[10**30, 1, 2])), "malformed_batch"),
        (lambda v, h: (v, resided(h, keys=[5, "a", "b"])), "malformed_batch"),
        (lambda v, h: (v, resided(h, offsets=[True, 1, 2])), "malformed_batch"),
        (lambda v, h: (v, resided(h, revisions="abc")), "malformed_batch"),
        (lambda v, h: (v, resided(h, source=7)), "malformed_batch"),
    ],
)
def test_a_batch_vtp_cannot_take_apart_is_a_framing_error(spoil, reason):
    value, header = pack(SOURCE, V1, [batched(n) for n in range(3)])
    with pytest.raises(FramingError) as caught:
        unpack(*spoil(value, header), STORE)
    assert caught.value.reason == reason


def test_a_container_of_one_block_per_body_reads_as_the_records_in_order():
    store = default_store()
    v2 = store.get("VehicleUpload", 2)
    records = [
        {
            "vin": "LRW3E7EK4NC00000" + str(i),
            "upload_id": f"u{i}",
            "sent_at_ms": i,
            "gateway_firmware": "1",
            "samples": [{"event_time_ms": i, "seq": i}],
        }
        for i in range(3)
    ]
    bodies = [store.encode(r, v2)[10:] for r in records]
    read = list(fastavro.reader(io.BytesIO(container_of_blocks(v2, bodies))))
    assert [r["upload_id"] for r in read] == ["u0", "u1", "u2"]

"""The samples ClickHouse's own Avro parser stores for the sink are the rows the sink's
Python path builds, in the real engine: the same owners, times, signals (nulls, enums,
lists), schema versions and provenance, and the same refusals. One batch holds both
schema versions, an upload that spans a sale, a vehicle that leaves the region, an owner
who erased, and a resend of a stored upload. The Kafka side is the in-memory double of
tests/unit: what is under test is what reaches the warehouse."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from producers.simulator import build_fleet, new_truth, simulate
from schemas import default_store
from schemas.envelope import BATCH_HEADER, BatchedUpload, pack
from schemas.registry import Period
from sinks.classify import judge, screen, sort_against_stored
from sinks.columnar import SampleRows
from sinks.erased import drop_erased_samples
from sinks.rows import SAMPLES_SCHEMA, UPLOADS_SCHEMA, StoredUpload, samples_table, uploads_table
from sinks.sink import RegionSink
from sinks.store import WarehouseSinkStore
from sinks.unbatch import expand
from tests.unit.sink_doubles import MemoryKafka, StaticRegistry
from vtp.core.settings import load_settings
from vtp.core.warehouse import ChdbWarehouse, WarehouseError

pytestmark = pytest.mark.integration

START_MS = 1_790_000_000_000
SALE = START_MS + 300_000  # the first vehicle changes hands
LEFT = START_MS + 400_000  # the second leaves the region's registry
ERASED = START_MS + 200_000  # the owner of the third erases


@pytest.fixture
def warehouse(tmp_path):
    # closed even when a test fails: chdb opens one folder per process at a time
    opened = ChdbWarehouse(tmp_path / "warehouse")
    yield opened
    opened.close()


def path_count(path: str) -> float:
    value = REGISTRY.get_sample_value(
        "vtp_sink_uploads_by_path_total", {"region": "eu", "path": path}
    )
    return value or 0.0


def batch_messages(kafka: MemoryKafka, topic: str, uploads: list[dict], per_message: int) -> None:
    """As the worker sends them: V2 and V1 writers alternating by message; each upload
    reached vtp when it was sent."""
    store = default_store()
    writers = [store.get("VehicleUpload", 2), store.get("VehicleUpload", 1)]
    for first in range(0, len(uploads), per_message):
        writer = writers[(first // per_message) % 3 == 2]  # two of three messages V2
        run = [
            BatchedUpload(store.encode(u, writer), u["vin"].encode(), first + i, u["sent_at_ms"], 1)
            for i, u in enumerate(uploads[first : first + per_message])
        ]
        value, sidecar = pack("vtp.eu.uploads:0", writer, run)
        kafka.append(topic, 0, None, value, [("vtp-region", b"eu"), (BATCH_HEADER, sidecar)])


def sink_over(settings, warehouse: ChdbWarehouse, kafka: MemoryKafka, registry) -> RegionSink:
    """The real sink on the real engine, its Kafka side the in-memory double."""
    return RegionSink(
        settings, warehouse, consumer=kafka.consumer(), producer=kafka.producer(), registry=registry
    )


def stored_rows(warehouse: ChdbWarehouse, table: str, names: list[str]) -> list[dict]:
    columns = ", ".join(f"`{n}`" for n in names)
    found = warehouse.query(f"SELECT {columns} FROM {table}").to_pylist()
    return sorted(found, key=repr)


def test_the_warehouse_stores_what_the_python_path_would_have(warehouse):
    settings = load_settings({}).with_(region="eu", sink_batch_messages=100_000, sink_flush_ms=0)
    fleet = build_fleet(7, owners=4, vehicles=6, regions=("eu",))
    sold, leaving, erasing = fleet[0], fleet[1], fleet[2]
    fleet[0] = replace(sold, history=(Period(0, sold.owner_id, "eu"), Period(SALE, "buyer", "eu")))
    fleet[1] = replace(
        leaving, history=(Period(0, leaving.owner_id, "eu"), Period(LEFT, None, None))
    )
    made = list(simulate(fleet, seed=7, start_ms=START_MS, duration_s=600, truth=new_truth(fleet)))
    resend = {**made[3], "sent_at_ms": made[-1]["sent_at_ms"]}  # the same upload id again
    made.append(resend)
    registry = StaticRegistry({v.vin: v.registration_in("eu") for v in fleet})

    kafka = MemoryKafka(partitions=1)
    topic = settings.topics.validated
    batch_messages(kafka, topic, made, per_message=20)
    sink = sink_over(settings, warehouse, kafka, registry)
    warehouse.execute(
        "INSERT INTO erasures (owner_id, erasure_id, requested_at, rows_deleted, version) "
        "VALUES ({o:String}, 'e-1', fromUnixTimestamp64Milli({t:Int64}, 'UTC'), '{{}}', 1)",
        {"o": erasing.owner_id, "t": ERASED},
    )
    avro_before, python_before = path_count("avro"), path_count("python")
    sink.run(should_stop=sink.consumer.drained)

    # The Python path alone, over the same messages.
    messages, broken = expand(kafka.logs[(topic, 0)], default_store())
    tagged, refused = screen(messages, "eu")
    good, judged = judge(tagged, "eu", registry)
    good, _ = drop_erased_samples(good, {erasing.owner_id: ERASED})
    fresh, resends, _ = sort_against_stored(good, {})
    assert not broken and not refused and judged and len(resends) == 1  # the batch covers each case

    samples = stored_rows(warehouse, "samples", SAMPLES_SCHEMA.names)
    assert samples == sorted(samples_table(fresh).to_pylist(), key=repr)
    uploads = stored_rows(warehouse, "uploads", UPLOADS_SCHEMA.names)
    assert uploads == sorted(uploads_table(fresh).to_pylist(), key=repr)
    assert {r["owner_id"] for r in samples} >= {"buyer", sold.owner_id, erasing.owner_id}
    assert {r["schema_version"] for r in samples} == {1, 2}
    expected_refusals = sorted(
        [(r.reason, r.source) for r in judged] + [("duplicate_upload", resends[0].raw_source)]
    )
    produced = sorted(
        (h["vtp-reason"].decode(), h["vtp-source"].decode()) for *_, h in kafka.produced
    )
    assert produced == expected_refusals
    # Both paths were taken: V2 uploads of plain vehicles whole from Avro, the rest
    # (V1, the sale, the move, the erasure, the resend's first copy) judged in Python.
    avro, python = path_count("avro") - avro_before, path_count("python") - python_before
    assert avro > 0 and python > 0 and avro + python == len(uploads)


def test_a_body_the_engine_cannot_parse_is_dead_lettered_and_the_rest_stored(warehouse):
    settings = load_settings({}).with_(region="eu", sink_batch_messages=100_000, sink_flush_ms=0)
    fleet = build_fleet(8, owners=2, vehicles=3, regions=("eu",))
    made = list(simulate(fleet, seed=8, start_ms=START_MS, duration_s=120, truth=new_truth(fleet)))[
        :12
    ]
    store, v2 = default_store(), default_store().get("VehicleUpload", 2)
    run = [
        BatchedUpload(store.encode(u, v2), u["vin"].encode(), i, u["sent_at_ms"], 1)
        for i, u in enumerate(made)
    ]
    broken = run[5].value
    run[5] = replace(run[5], value=broken[:-7] + b"\xff" * 7)  # its last sample's tail
    kafka = MemoryKafka(partitions=1)
    topic = settings.topics.validated
    value, sidecar = pack("vtp.eu.uploads:0", v2, run)
    kafka.append(topic, 0, None, value, [("vtp-region", b"eu"), (BATCH_HEADER, sidecar)])
    registry = StaticRegistry({v.vin: v.registration_in("eu") for v in fleet})
    sink = sink_over(settings, warehouse, kafka, registry)
    python = path_count("python")
    sink.run(should_stop=sink.consumer.drained)
    stored = {r["upload_id"] for r in warehouse.query("SELECT upload_id FROM uploads").to_pylist()}
    assert stored == {u["upload_id"] for i, u in enumerate(made) if i != 5}
    [(_, _, dead, headers)] = kafka.produced
    assert headers["vtp-reason"] == b"malformed_avro" and dead == run[5].value
    assert path_count("python") - python == 11  # the engine refused the container: one by one


def three_vehicles():
    """Settings, a fleet of three vehicles (three owners), an upload of each, empty topics."""
    settings = load_settings({}).with_(region="eu", sink_batch_messages=100_000, sink_flush_ms=0)
    fleet = build_fleet(9, owners=3, vehicles=3, regions=("eu",))
    made = list(simulate(fleet, seed=9, start_ms=START_MS, duration_s=60, truth=new_truth(fleet)))
    firsts = {}
    for u in made:
        firsts.setdefault(u["vin"], u)
    kafka = MemoryKafka(partitions=1)
    return settings, fleet, [firsts[v.vin] for v in fleet], kafka


def test_bodies_that_are_not_one_record_each_cannot_shift_owners(warehouse):
    settings, fleet, (a, l1, l2), kafka = three_vehicles()
    store, v2 = default_store(), default_store().get("VehicleUpload", 2)

    def body(u):
        return store.encode(u, v2)

    x = {**a, "vin": "FOREIGNVIN0000000", "upload_id": "forged-x"}  # registered nowhere
    topic = settings.topics.validated
    forged = [  # the first body holds two records, the second none
        BatchedUpload(body(a) + body(x)[10:], a["vin"].encode(), 0, START_MS, 1),
        BatchedUpload(body(x)[:10], x["vin"].encode(), 1, START_MS, 1),
    ]
    honest = [
        BatchedUpload(body(u), u["vin"].encode(), 2 + i, START_MS, 1)
        for i, u in enumerate([l1, l2])
    ]
    for run in (forged, honest):
        value, sidecar = pack("vtp.eu.uploads:0", v2, run)
        kafka.append(topic, 0, None, value, [("vtp-region", b"eu"), (BATCH_HEADER, sidecar)])
    registry = StaticRegistry({v.vin: v.registration_in("eu") for v in fleet})
    sink = sink_over(settings, warehouse, kafka, registry)
    sink.run(should_stop=sink.consumer.drained)
    owner_of = {v.vin: v.owner_id for v in fleet}
    stored = warehouse.query(
        "SELECT vin, owner_id, count() AS n FROM samples GROUP BY vin, owner_id ORDER BY vin"
    ).to_pylist()
    assert stored == sorted(
        [
            {"vin": u["vin"], "owner_id": owner_of[u["vin"]], "n": len(u["samples"])}
            for u in (l1, l2)
        ],
        key=lambda r: r["vin"],
    )
    reasons = sorted(h["vtp-reason"] for *_, h in kafka.produced)
    assert reasons == [b"malformed_avro", b"malformed_avro"]  # both forged bodies, with their bytes
    assert kafka.committed == {(topic, 0): 2}


def test_text_that_is_not_utf8_is_refused_as_the_python_path_refuses_it(warehouse):
    settings, fleet, (a, b, c), kafka = three_vehicles()
    store, v2 = default_store(), default_store().get("VehicleUpload", 2)
    bad = bytearray(store.encode({**a, "upload_id": "X" * 36}, v2))
    bad[bad.find(b"X" * 36)] = 0xFF
    run = [BatchedUpload(bytes(bad), a["vin"].encode(), 0, START_MS, 1)] + [
        BatchedUpload(store.encode(u, v2), u["vin"].encode(), 1 + i, START_MS, 1)
        for i, u in enumerate([b, c])
    ]
    value, sidecar = pack("vtp.eu.uploads:0", v2, run)
    topic = settings.topics.validated
    kafka.append(topic, 0, None, value, [("vtp-region", b"eu"), (BATCH_HEADER, sidecar)])
    registry = StaticRegistry({v.vin: v.registration_in("eu") for v in fleet})
    avro = path_count("avro")
    sink = sink_over(settings, warehouse, kafka, registry)
    sink.run(should_stop=sink.consumer.drained)
    stored = {r["upload_id"] for r in warehouse.query("SELECT upload_id FROM uploads").to_pylist()}
    assert stored == {b["upload_id"], c["upload_id"]} and path_count("avro") - avro == 2
    [(_, _, dead, headers)] = kafka.produced
    assert headers["vtp-reason"] == b"malformed_avro" and dead == bytes(bad)


def test_an_insert_whose_container_holds_other_uploads_than_decided_stores_nothing(warehouse):
    _, _, (a, b, _), _ = three_vehicles()
    store = WarehouseSinkStore(warehouse, b"k" * 32, owns=False)
    store.prepare()
    rows = SampleRows()
    for u in (a, b):  # pieces as the Python path encodes them
        rows.add_piece(StoredUpload(u, "owner", "eu", 2, START_MS, "raw:0:0", "v", 0, 0))
    rows.vins.reverse()  # the sink's decision for each position, swapped
    with pytest.raises(WarehouseError, match="not the one the sink decided"):
        store.insert_samples(rows, "eu", "v-0-0-1")
    assert warehouse.query("SELECT count() AS n FROM samples").to_pylist() == [{"n": 0}]


def shifted(upload: dict, months: int, upload_id: str) -> dict:
    """``upload`` moved ``months`` times 31 days later, under another id."""
    shift = months * 31 * 86_400_000
    samples = [{**s, "event_time_ms": s["event_time_ms"] + shift} for s in upload["samples"]]
    return {
        **upload,
        "upload_id": upload_id,
        "sent_at_ms": upload["sent_at_ms"] + shift,
        "samples": samples,
    }


def test_a_batch_over_many_months_is_stored_and_a_negative_seq_refused(warehouse):
    settings, fleet, (a, _, _), kafka = three_vehicles()
    store, v2 = default_store(), default_store().get("VehicleUpload", 2)
    uploads = [shifted(a, k, f"month-{k}") for k in range(101)]  # 101 month partitions
    negative = shifted(a, 0, "negative-seq")
    negative["samples"][0]["seq"] = -1
    run = [
        BatchedUpload(store.encode(u, v2), u["vin"].encode(), i, u["sent_at_ms"], 1)
        for i, u in enumerate([*uploads, negative])
    ]
    value, sidecar = pack("vtp.eu.uploads:0", v2, run)
    topic = settings.topics.validated
    kafka.append(topic, 0, None, value, [("vtp-region", b"eu"), (BATCH_HEADER, sidecar)])
    registry = StaticRegistry({v.vin: v.registration_in("eu") for v in fleet})
    sink = sink_over(settings, warehouse, kafka, registry)
    sink.run(should_stop=sink.consumer.drained)
    (counts,) = warehouse.query(
        "SELECT count() AS n, uniqExact(toYYYYMM(event_time)) AS months FROM samples"
    ).to_pylist()
    assert counts == {"n": 101 * len(a["samples"]), "months": 101}
    [(_, _, dead, headers)] = kafka.produced
    assert headers["vtp-reason"] == b"invalid_sample" and dead == run[-1].value
    assert kafka.committed == {(topic, 0): 1}

"""The sink's flow over in-memory doubles (tests/unit/sink_doubles.py): a batch is
committed only after it is stored, a crash replays the same range and stores each row
once, and what may not be stored is refused with its reason, the batch still committed.
tests/integration/test_sink.py runs the same sink against the real broker and engine."""

from __future__ import annotations

import json
import zlib

import pytest
from prometheus_client import REGISTRY

from producers.simulator import build_fleet, new_truth, simulate
from schemas import default_store
from schemas.aggregates import encode_aggregate
from schemas.envelope import BATCH_HEADER, BatchedUpload, pack
from sinks.sink import RegionSink, SinkError
from stream_jobs.sessions import SessionConfig, advance, flush, ingest, new_state
from tests.unit.sink_doubles import Crash, MemoryKafka, MemoryStore, StaticRegistry
from vtp.core.settings import load_settings
from vtp.core.warehouse import WarehouseError

START_MS = 1_790_000_000_000
SETTINGS = load_settings({}).with_(region="eu", sink_batch_messages=10, sink_flush_ms=0)
VALIDATED = SETTINGS.topics.validated


@pytest.fixture(scope="module")
def uploads():
    fleet = build_fleet(3, owners=3, vehicles=4, regions=("eu",))
    truth = new_truth(fleet)
    made = list(simulate(fleet, seed=3, start_ms=START_MS, duration_s=300, truth=truth))
    registry = {v.vin: v.registration_in("eu") for v in fleet}
    return made, registry


def publish(kafka: MemoryKafka, uploads: list[dict], region: str = "eu") -> None:
    store, v1 = default_store(), default_store().get("VehicleUpload", 1)
    for i, upload in enumerate(uploads):
        kafka.append(
            VALIDATED,
            zlib.crc32(upload["vin"].encode()) % kafka.partitions,  # stable across runs
            upload["vin"].encode(),
            store.encode(upload, v1),
            [("vtp-region", region.encode()), ("vtp-source", f"raw:0:{i}".encode())],
        )


def sink_over(kafka: MemoryKafka, store: MemoryStore, registry: dict) -> RegionSink:
    return RegionSink(
        SETTINGS,
        store=store,
        consumer=kafka.consumer(),
        producer=kafka.producer(),
        registry=StaticRegistry(registry),
    )


def run_until_drained(sink: RegionSink) -> None:
    sink.run(should_stop=sink.consumer.drained)


def test_each_batch_is_committed_only_after_it_is_stored(uploads):
    made, registry = uploads
    kafka = MemoryKafka()
    store = MemoryStore(kafka.events)
    publish(kafka, made)
    run_until_drained(sink_over(kafka, store, registry))
    assert len(store.tables["uploads"]) == len(made)
    assert len(store.tables["samples"]) == sum(len(u["samples"]) for u in made)
    ends = {tp: len(log) for tp, log in kafka.logs.items()}
    assert kafka.committed == ends and not kafka.produced
    assert len(store.batches) > 2  # several batches
    for topic, partition, first, last in store.batches:
        # its samples, then its uploads, then a commit past its last offset
        token = f"{topic}-{partition}-{first}-{last}"
        samples = kafka.events.index(f"insert samples {token}")
        uploads = kafka.events.index(f"insert uploads {token}")
        commit = next(
            i
            for i, e in enumerate(kafka.events)
            if e.startswith(f"commit {topic}:{partition}@") and int(e.rsplit("@")[1]) > last
        )
        assert samples < uploads < commit


def test_a_crash_between_samples_and_uploads_replays_the_range_and_stores_each_row_once(
    uploads,
):
    made, registry = uploads
    kafka = MemoryKafka()
    store = MemoryStore(kafka.events)
    publish(kafka, made)
    inserts = {"uploads": 0}

    def die_at_the_second_uploads_insert(table: str) -> None:
        if table == "uploads":
            inserts["uploads"] += 1
            if inserts["uploads"] == 2:
                raise Crash("after the samples insert")

    store.fail_on = die_at_the_second_uploads_insert
    with pytest.raises(Crash):
        run_until_drained(sink_over(kafka, store, registry))
    # The round (every ready batch) commits after all its batches are stored: nothing yet.
    assert kafka.committed == {} and len(store.batches) > 2
    store.fail_on = lambda table: None
    run_until_drained(sink_over(kafka, store, registry))  # a restarted sink
    assert len(store.tables["uploads"]) == len(made)
    assert len(store.tables["samples"]) == sum(len(u["samples"]) for u in made)
    replayed = [e.split()[1] for e in kafka.events if e.endswith("(deduplicated)")]
    assert replayed == ["samples", "uploads", "samples"]  # the first batch, then the second's


def test_what_may_not_be_stored_is_refused_with_its_reason_and_the_batch_still_commits(
    uploads,
):
    made, registry = uploads
    kafka = MemoryKafka(partitions=1)
    store = MemoryStore(kafka.events)
    good, resent, stranger = made[0], dict(made[1]), dict(made[2])
    stranger["vin"] = "WVWZZZ1KZAW000999"  # registered nowhere here
    stranger["samples"] = [dict(s) for s in made[2]["samples"]]
    encoded = default_store().encode(good, default_store().get("VehicleUpload", 1))
    publish(kafka, [good, made[1]])
    kafka.append(VALIDATED, 0, b"x", encoded, [("vtp-source", b"raw:0:90")])  # untagged
    kafka.append(VALIDATED, 0, b"x", encoded, [("vtp-region", b"cn"), ("vtp-source", b"r:0:91")])
    kafka.append(VALIDATED, 0, b"x", b"\x00junk", [("vtp-region", b"eu")])
    publish(kafka, [stranger])
    # the same upload id again from another raw message: a resend, not a replay
    v1 = default_store().get("VehicleUpload", 1)
    resend = default_store().encode(resent, v1)
    kafka.append(VALIDATED, 0, b"x", resend, [("vtp-region", b"eu"), ("vtp-source", b"raw:0:99")])
    kafka.append(VALIDATED, 0, b"x", b"", [("vtp-control", b"registry")])  # not data
    run_until_drained(sink_over(kafka, store, registry))
    reasons = sorted(
        (topic.rsplit(".", 1)[1], headers["vtp-reason"].decode())
        for topic, _, _, headers in kafka.produced
    )
    assert reasons == [
        ("deadletter", "duplicate_upload"),
        ("deadletter", "not_single_object"),
        ("deadletter", "residency_mismatch"),
        ("deadletter", "untagged"),
        ("quarantine", "unknown_vin"),
    ]
    assert {r["upload_id"] for r in store.tables["uploads"]} == {
        good["upload_id"],
        made[1]["upload_id"],
    }
    assert kafka.committed == {(VALIDATED, 0): len(kafka.logs[(VALIDATED, 0)])}


def test_dead_letters_the_broker_does_not_acknowledge_stop_the_sink_uncommitted(uploads):
    made, registry = uploads
    kafka = MemoryKafka(partitions=1, unacknowledged=1)
    publish(kafka, [made[0]], region="cn")  # refused: tagged for another region
    with pytest.raises(SinkError, match="did not acknowledge"):
        run_until_drained(sink_over(kafka, MemoryStore(kafka.events), registry))
    assert kafka.committed == {}


def test_aggregates_in_avro_and_from_older_workers_in_json_are_stored_junk_refused(uploads):
    made, registry = uploads
    config, records = SessionConfig(), []
    states = {}
    for upload in made:
        vin = upload["vin"]
        reg = registry[vin]
        state = states.setdefault(vin, new_state(vin, "eu", reg.time_zone, 60.0))
        ingest(state, upload, config, reg)
        records += advance(state, config, reg)
    for vin, state in states.items():
        records += flush(state, config, registry[vin])
    kafka = MemoryKafka(partitions=1)
    aggregates = SETTINGS.topics.aggregates
    for i, record in enumerate(records):
        old_worker = i % 5 == 0
        value = json.dumps(record).encode() if old_worker else encode_aggregate(record)
        kafka.append(aggregates, 0, record["vin"].encode(), value)
    kafka.append(aggregates, 0, b"x", b"\xc3\x01junk")
    store = MemoryStore(kafka.events)
    run_until_drained(sink_over(kafka, store, registry))
    stored = {table: len(rows) for table, rows in store.tables.items()}
    by_kind = {k: sum(r["kind"] == k for r in records) for k in ("trip", "charge", "day")}
    assert stored["trips"] == by_kind["trip"] > 0
    assert stored["daily_summaries"] == by_kind["day"] > 0
    assert stored.get("charges", 0) == by_kind["charge"]
    assert stored["open_sessions"] == sum(r["kind"].startswith("open_") for r in records)
    assert [h["vtp-reason"] for *_, h in kafka.produced] == [b"malformed_aggregate"]


def publish_batches(kafka: MemoryKafka, uploads: list[dict], per_message: int) -> None:
    """As the worker sends them: batch messages (schemas.envelope) on partition 0, V1 and
    V2 writers alternating by message."""
    store = default_store()
    writers = [store.get("VehicleUpload", 1), store.get("VehicleUpload", 2)]
    for first in range(0, len(uploads), per_message):
        writer = writers[(first // per_message) % 2]
        run = [
            BatchedUpload(store.encode(u, writer), u["vin"].encode(), first + i, START_MS, 1)
            for i, u in enumerate(uploads[first : first + per_message])
        ]
        value, sidecar = pack("vtp.eu.uploads:0", writer, run)
        kafka.append(VALIDATED, 0, None, value, [("vtp-region", b"eu"), (BATCH_HEADER, sidecar)])


def test_batch_messages_of_two_writer_versions_are_stored_upload_by_upload(uploads):
    made, registry = uploads
    kafka = MemoryKafka(partitions=1)
    store = MemoryStore(kafka.events)
    publish_batches(kafka, made, per_message=7)
    run_until_drained(sink_over(kafka, store, registry))
    stored = store.tables["uploads"]
    assert sorted(r["upload_id"] for r in stored) == sorted(u["upload_id"] for u in made)
    assert {r["raw_source"] for r in stored} == {f"vtp.eu.uploads:0:{i}" for i in range(len(made))}
    assert {r["schema_version"] for r in stored} == {1, 2}
    assert len(store.tables["samples"]) == sum(len(u["samples"]) for u in made)
    # batches are cut by uploads (10 here), never inside a message
    assert all((last - first + 1) * 7 >= 10 for _, _, first, last in store.batches[:-1])
    assert kafka.committed == {(VALIDATED, 0): len(kafka.logs[(VALIDATED, 0)])}


def test_a_resend_inside_a_batch_message_is_refused_with_its_own_bytes(uploads):
    made, registry = uploads
    kafka = MemoryKafka(partitions=1)
    store = MemoryStore(kafka.events)
    publish_batches(kafka, [made[0], made[1], made[0]], per_message=3)  # made[0] twice
    run_until_drained(sink_over(kafka, store, registry))
    assert sorted(r["upload_id"] for r in store.tables["uploads"]) == sorted(
        [made[0]["upload_id"], made[1]["upload_id"]]
    )
    [(topic, key, value, headers)] = kafka.produced
    assert topic.endswith("deadletter") and headers["vtp-reason"] == b"duplicate_upload"
    assert headers["vtp-source"] == b"vtp.eu.uploads:0:2"
    assert key == made[0]["vin"].encode()
    assert default_store().decode(value)[0]["upload_id"] == made[0]["upload_id"]


def test_a_batch_message_that_cannot_be_taken_apart_is_dead_lettered_whole(uploads):
    made, registry = uploads
    kafka = MemoryKafka(partitions=1)
    store = MemoryStore(kafka.events)
    publish_batches(kafka, made[:3], per_message=3)
    first = kafka.logs[(VALIDATED, 0)][0]
    value = first.value() or b""
    kafka.append(VALIDATED, 0, None, value[:-40], first.headers() or [])  # truncated
    publish_batches(kafka, made[3:6], per_message=3)
    run_until_drained(sink_over(kafka, store, registry))
    assert len(store.tables["uploads"]) == 6
    [(topic, _, dead, headers)] = kafka.produced
    assert topic.endswith("deadletter") and headers["vtp-reason"] == b"malformed_batch"
    assert dead == value[:-40]


def v2_batch(kafka: MemoryKafka, uploads: list[dict], keys: list[bytes] | None = None) -> None:
    store, v2 = default_store(), default_store().get("VehicleUpload", 2)
    run = [
        BatchedUpload(store.encode(u, v2), key, i, START_MS, 1)
        for i, (u, key) in enumerate(
            zip(uploads, keys or [u["vin"].encode() for u in uploads], strict=True)
        )
    ]
    value, sidecar = pack("vtp.eu.uploads:0", v2, run)
    kafka.append(VALIDATED, 0, None, value, [("vtp-region", b"eu"), (BATCH_HEADER, sidecar)])


def by_path(path: str) -> float:
    value = REGISTRY.get_sample_value(
        "vtp_sink_uploads_by_path_total", {"region": "eu", "path": path}
    )
    return value or 0.0


def test_uploads_the_warehouse_cannot_read_are_judged_one_by_one_and_stored(uploads):
    made, registry = uploads
    kafka = MemoryKafka(partitions=1)
    store = MemoryStore(kafka.events)
    v2_batch(kafka, made[:8])

    def unreadable(container: bytes):
        raise WarehouseError("Code: 117. INCORRECT_DATA")

    store.upload_facts = unreadable  # type: ignore[method-assign]
    python = by_path("python")
    run_until_drained(sink_over(kafka, store, registry))
    assert sorted(r["upload_id"] for r in store.tables["uploads"]) == sorted(
        u["upload_id"] for u in made[:8]
    )
    assert by_path("python") - python == 8 and not kafka.produced


def test_a_batch_keyed_by_other_vins_than_its_bodies_is_judged_by_the_bodies(uploads):
    made, registry = uploads
    kafka = MemoryKafka(partitions=1)
    store = MemoryStore(kafka.events)
    keys = [made[1]["vin"].encode()] + [u["vin"].encode() for u in made[1:6]]
    v2_batch(kafka, made[:6], keys)  # the first upload's key names another vehicle
    avro, python = by_path("avro"), by_path("python")
    run_until_drained(sink_over(kafka, store, registry))
    owner_of = {vin: reg.current.owner_id for vin, reg in registry.items()}
    assert {(r["vin"], r["owner_id"]) for r in store.tables["samples"]} == {
        (u["vin"], owner_of[u["vin"]]) for u in made[:6]
    }
    # only the mis-keyed upload is judged in Python; the others are stored whole
    assert by_path("python") - python == 1 and by_path("avro") - avro == 5


def test_plain_uploads_of_the_newest_schema_are_stored_whole_from_their_bodies(uploads):
    made, registry = uploads
    kafka = MemoryKafka(partitions=1)
    store = MemoryStore(kafka.events)
    v2_batch(kafka, made[:6])
    avro = by_path("avro")
    run_until_drained(sink_over(kafka, store, registry))
    assert by_path("avro") - avro == 6
    assert len(store.tables["samples"]) == sum(len(u["samples"]) for u in made[:6])
    (row,) = [r for r in store.tables["uploads"] if r["upload_id"] == made[0]["upload_id"]]
    assert row["raw_source"] == "vtp.eu.uploads:0:0" and row["schema_version"] == 2
    assert row["sample_count"] == len(made[0]["samples"])


def test_pseudonyms_are_asked_for_once_per_pair_and_again_after_the_owner_erased(uploads):
    made, registry = uploads
    vin = max({u["vin"] for u in made}, key=lambda v: sum(u["vin"] == v for u in made))
    mine = [u for u in made if u["vin"] == vin]
    assert len(mine) >= 3
    kafka = MemoryKafka(partitions=1)
    store = MemoryStore(kafka.events)
    asked: list[set] = []
    record = store.record_pseudonyms
    store.record_pseudonyms = lambda pairs: (asked.append(set(pairs)), record(pairs))[1]  # type: ignore[method-assign]
    sink = sink_over(kafka, store, registry)
    owner = registry[vin].current.owner_id
    v2_batch(kafka, mine[:1])
    run_until_drained(sink)
    sink._stop = False
    v2_batch(kafka, mine[1:2])
    run_until_drained(sink)
    assert len(store.batches) == 2 and asked == [{(owner, vin)}]  # known the second time
    # The owner erases: their rows and pseudonyms go; their new data needs one again.
    store.pseudonym_pairs.clear()
    store.erasures[owner] = START_MS - 1
    sink._stop = False
    v2_batch(kafka, mine[2:3])
    run_until_drained(sink)
    assert store.pseudonym_pairs == {(owner, vin)}

"""The sink in-process against the real broker and the real engine: a crash between
inserting a batch's samples and its uploads, then a restart, leaves exact rows."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Producer

from producers.publish import DEFAULT_START_MS
from producers.simulator import build_fleet, new_truth, simulate
from schemas import default_store
from sinks.sink import RegionSink, SinkError
from sinks.warehouse import ChdbWarehouse, WarehouseError, rows
from vtp.pipeline import group_position
from vtp.topics import create_topics

pytestmark = pytest.mark.integration


class CrashingWarehouse(ChdbWarehouse):
    """The real embedded engine, failing the Nth uploads insert as a crash would."""

    def __init__(self, path, crash_on_uploads_insert: int):
        super().__init__(path)
        self._uploads_inserts = 0
        self._crash_on = crash_on_uploads_insert

    def insert_arrow(self, table, data, dedup_token=None):
        if table == "uploads":
            self._uploads_inserts += 1
            if self._uploads_inserts == self._crash_on:
                raise WarehouseError("simulated crash after the samples insert")
        return super().insert_arrow(table, data, dedup_token)


@pytest.fixture
def eu_topic(base_settings, tmp_path):
    settings = base_settings.with_(
        data_dir=tmp_path, topic_prefix=f"sink-{uuid.uuid4().hex[:6]}", sink_batch_messages=25,
        sink_flush_ms=200, regions=("cn", "eu"),
    )  # fmt: skip
    create_topics(settings)
    fleet = [v for v in build_fleet(2, owners=6, vehicles=10) if v.region == "eu"]
    truth = new_truth(fleet)
    store = default_store()
    v1 = store.get("VehicleUpload", 1)
    producer = Producer(
        {"bootstrap.servers": settings.bootstrap(), "partitioner": "murmur2_random"}
    )
    count = 0
    for i, upload in enumerate(
        simulate(fleet, seed=2, start_ms=DEFAULT_START_MS, duration_s=600, truth=truth)
    ):
        owner = next(v.owner_id for v in fleet if v.vin == upload["vin"])
        producer.produce(
            settings.topics.validated("eu"), key=upload["vin"].encode(), value=store.encode(upload, v1),
            headers=[("vtp-region", b"eu"), ("vtp-owner", owner.encode()),
                     ("vtp-source", f"{settings.topics.uploads}:0:{i}".encode())],
        )  # fmt: skip
        count += 1
    assert producer.flush(30) == 0
    return settings, truth, count


def run_until_drained(sink: RegionSink, settings, timeout=120):
    group, topics = sink.group, [sink.topic]
    deadline = time.monotonic() + timeout
    last_check = [0.0]

    def drained() -> bool:
        if time.monotonic() > deadline:
            return True
        if time.monotonic() - last_check[0] < 1.0:
            return False
        last_check[0] = time.monotonic()
        committed, high = group_position(settings, group, topics)
        return committed >= high

    sink.run(should_stop=drained)


def test_crash_between_samples_and_uploads_then_restart_leaves_exact_rows(eu_topic, tmp_path):
    settings, truth, uploads = eu_topic
    crashing = CrashingWarehouse(settings.warehouse_path("eu"), crash_on_uploads_insert=3)
    with pytest.raises(WarehouseError, match="simulated crash"):
        RegionSink(settings, "eu", warehouse=crashing).run()
    committed, high = group_position(
        settings, f"{settings.topic_prefix}-sink-eu", [settings.topics.validated("eu")]
    )
    assert 0 < committed < high  # two batches committed, the third not

    sink = RegionSink(settings, "eu")
    run_until_drained(sink, settings)
    wh = ChdbWarehouse(settings.warehouse_path("eu"))
    try:
        ((samples, distinct),) = rows(wh.query("SELECT count(), uniqExact(vin, seq) FROM samples"))
        (stored_uploads,) = rows(wh.query("SELECT count() FROM uploads"))[0]
        replayed = rows(wh.query(
            "SELECT count() FROM sink_batches GROUP BY partition, first_offset HAVING count() > 1"
        ))  # fmt: skip
    finally:
        wh.close()
    assert samples == distinct == truth.totals()["samples"]
    assert stored_uploads == uploads == sink.stored_uploads + 50  # 2 batches of 25 before the crash
    assert replayed == []  # the replayed range was imposed, not recorded again


def test_unknown_region_is_refused_at_start(base_settings, tmp_path):
    settings = base_settings.with_(data_dir=tmp_path)
    with pytest.raises(SinkError, match="not one of VTP_REGIONS"):
        RegionSink(settings, "us")

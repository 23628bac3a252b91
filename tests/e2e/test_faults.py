"""Faults on the real pipeline: the worker killed again and again, the broker stopped and
started mid-run, the service killed during an erasure. Each run reconciles exactly:
nothing lost, nothing stored twice."""

from __future__ import annotations

import os
import random
import signal
import time

import httpx
import pytest
from confluent_kafka import OFFSET_INVALID, Consumer, TopicPartition

from deploy.broker import start_broker, stop_broker
from owner_api.tokens import issue, owner_claims
from producers.publish import DEFAULT_START_MS, publish_fleet, register_fleet
from producers.simulator import build_fleet
from sinks.migrations import migrate
from tests.e2e.test_pipeline import free_port, scrape
from vtp.core.keys import load_keyring
from vtp.core.settings import load_settings
from vtp.core.topics import create_topics
from vtp.core.warehouse import ChdbWarehouse, open_warehouse, rows
from vtp.harness import (
    read_outcomes,
    start_serve,
    start_sink,
    start_worker,
    topic_message_count,
    wait_drained,
)
from vtp.oracle import compare
from vtp.serve import wait_for_service

pytestmark = pytest.mark.e2e


def _stored(settings) -> tuple[int, int, int]:
    """(distinct uploads, samples, distinct samples) in the region's warehouse."""
    wh = open_warehouse(settings)
    try:
        ((uploads,),) = rows(wh.query("SELECT uniqExact(upload_id) FROM uploads"))
        ((samples, distinct),) = rows(wh.query("SELECT count(), uniqExact(vin, seq) FROM samples"))
    finally:
        wh.close()
    return uploads, samples, distinct


def _reconciles(settings, stored_uploads: int) -> None:
    outcomes = read_outcomes(settings)
    produced = topic_message_count(settings, settings.topics.uploads)
    assert produced == stored_uploads + outcomes.deadlettered_total + outcomes.quarantined_total


def _everything_once(settings, published, fleet):
    """Every upload and sample stored once, the counts reconcile, and every trip, charge
    and day is found as the simulator drove it; returns the comparison."""
    uploads, samples, distinct = _stored(settings)
    assert (uploads, samples, distinct) == (published.uploads, published.samples, published.samples)
    _reconciles(settings, uploads)
    wh = open_warehouse(settings)
    try:
        c = compare(wh, published.truth, [v.vin for v in fleet])
    finally:
        wh.close()
    assert not c.problems, c.problems[:5]
    assert c.trips_found == c.trips_expected > 0 and c.charges_found == c.charges_expected
    return c


def test_a_worker_killed_ten_times_loses_nothing_and_counts_nothing_twice(region_stack):
    settings = region_stack("eu", "kills", sink_batch_messages=200, sink_flush_ms=300)
    fleet = build_fleet(71, owners=4, vehicles=8, regions=("eu",))
    register_fleet(settings, fleet)
    published = publish_fleet(settings, fleet, seed=71, duration_s=3 * 3600)
    assert published.report.ok
    worker, sink = start_worker(settings), start_sink(settings)
    rng = random.Random(4)
    kills = 0
    try:
        while kills < 10:
            time.sleep(rng.uniform(2.0, 5.0))  # sometimes mid-batch, sometimes mid-start
            os.kill(worker.popen.pid, signal.SIGKILL)
            worker.popen.wait(10)
            kills += 1
            worker = start_worker(settings)
        assert wait_drained(settings, [worker, sink], timeout=400)
    finally:
        worker.stop()
        sink.stop()
    print(f"\n{kills} kills:\n{_everything_once(settings, published, fleet).table()}")


def _worker_positions(settings) -> tuple[list[int], int]:
    """(the worker group's committed offsets on the uploads topic, records in the worker's
    two vehicle tables' changelogs)."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap(), "group.id": "observer"})
    try:
        partitions = range(settings.topic_partitions)
        uploads = [TopicPartition(settings.topics.uploads, p) for p in partitions]
        group = Consumer(
            {"bootstrap.servers": settings.bootstrap(), "group.id": settings.topics.worker_app}
        )
        try:
            committed = [tp.offset for tp in group.committed(uploads, timeout=10)]
        finally:
            group.close()
        state_records = 0
        for table in ("vehicle_sessions", "seen_uploads"):
            topic = f"{settings.topics.worker_app}-{table}-changelog"
            if topic in consumer.list_topics(timeout=10).topics:
                for p in partitions:
                    low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                    state_records += high - low
    finally:
        consumer.close()
    return committed, state_records


def test_a_worker_killed_before_its_first_checkpoint_reads_everything_again(region_stack):
    """States are written, and the uploads committed, only at checkpoints. With one
    longer than the run, the fleet's hour is routed, aggregated and stored with nothing
    committed and no state written; the killed worker's successor reads it all again,
    and every upload is stored once and every trip, charge and day found once."""
    settings = region_stack(
        "eu",
        "checkpoint",
        state_checkpoint_s=3600.0,
        worker_stall_s=0.0,
        sink_batch_messages=200,
        sink_flush_ms=300,
    )
    fleet = build_fleet(72, owners=3, vehicles=6, regions=("eu",))
    register_fleet(settings, fleet)
    published = publish_fleet(settings, fleet, seed=72, duration_s=3600)
    assert published.report.ok
    sink_metrics = free_port()
    worker, sink = start_worker(settings), start_sink(settings, metrics_port=sink_metrics)
    try:

        def stored_uploads() -> float:
            try:
                metrics = scrape(sink_metrics)
            except OSError:  # not listening yet
                return 0.0
            return metrics.get('vtp_sink_uploads_stored_total{region="eu"}', 0.0)

        deadline = time.monotonic() + 300
        while stored_uploads() < published.uploads and time.monotonic() < deadline:
            time.sleep(1)
        assert stored_uploads() == published.uploads
        committed, state_records = _worker_positions(settings)
        assert committed == [OFFSET_INVALID] * settings.topic_partitions
        assert state_records == 0
        os.kill(worker.popen.pid, signal.SIGKILL)
        worker.popen.wait(10)
        worker = start_worker(settings.with_(state_checkpoint_s=1.0))
        assert wait_drained(settings, [worker, sink], timeout=300)
        committed, state_records = _worker_positions(settings)
        assert min(committed) > 0 and state_records > 0
    finally:
        worker.stop()
        sink.stop()
    _everything_once(settings, published, fleet)


def test_the_broker_stopped_and_started_mid_run_loses_nothing(tmp_path):
    base = load_settings({}).with_(
        region="cn",
        data_dir=tmp_path,
        sink_batch_messages=200,
        sink_flush_ms=300,
        sink_aggregates_flush_ms=300,
    )
    state = start_broker(base)
    settings = base.with_(kafka_bootstrap=state.bootstrap, broker_port=state.port)
    processes = []
    try:
        create_topics(settings)
        fleet = build_fleet(73, owners=4, vehicles=8, regions=("cn",))
        register_fleet(settings, fleet)
        processes = [start_worker(settings), start_sink(settings)]
        first = publish_fleet(settings, fleet, seed=73, duration_s=3600)
        assert first.report.ok
        time.sleep(3)  # the pipeline is busy with it
        assert stop_broker(settings)
        time.sleep(5)  # the cluster is gone for a while; the processes wait for it
        assert all(p.popen.poll() is None for p in processes)
        again = start_broker(settings)  # the same data, the same port
        assert again.port == state.port
        later = publish_fleet(
            settings, fleet, seed=74, duration_s=1800, start_ms=DEFAULT_START_MS + 2 * 3600_000
        )
        assert later.report.ok
        assert wait_drained(settings, processes, timeout=400)
    finally:
        for p in processes:
            p.stop()
    uploads, samples, distinct = _stored(settings)
    expected_samples = first.samples + later.samples
    assert (uploads, samples, distinct) == (
        first.uploads + later.uploads,
        expected_samples,
        expected_samples,
    )
    _reconciles(settings, uploads)
    stop_broker(settings)


def test_the_service_killed_during_an_erasure_finishes_it_after_a_restart(region_stack):
    settings = region_stack("eu", "erasekill", sink_batch_messages=200, sink_flush_ms=300)
    fleet = build_fleet(75, owners=4, vehicles=6, regions=("eu",))
    register_fleet(settings, fleet)
    owner = fleet[0].owner_id
    # a large owner, so the erasure is still at work when the service dies
    wh = ChdbWarehouse(settings.warehouse_path)
    try:
        migrate(wh)
        wh.execute(
            "INSERT INTO samples (owner_id, vin, event_time, seq, upload_id, speed, region, "
            "schema_version, received_at) SELECT {o:String}, {v:String}, "
            "fromUnixTimestamp64Milli(toInt64({t:Int64} + number * 1000), 'UTC'), number, "
            "concat('bulk', toString(intDiv(number, 100))), 50, 'eu', 1, now64(3) "
            "FROM numbers(3000000)",
            {"o": owner, "v": fleet[0].vin, "t": DEFAULT_START_MS - 40 * 86_400_000},
        )
    finally:
        wh.close()
    ring = load_keyring(settings)
    worker, serve = start_worker(settings), start_serve(settings)
    try:
        url = wait_for_service(settings, serve)
        published = publish_fleet(settings, fleet, seed=75, duration_s=1800)
        assert published.report.ok
        assert wait_drained(settings, [worker, serve], timeout=300)
        token = issue(ring, owner_claims(owner, "eu", 600))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
            r = api.post("/v1/erasure")
            assert r.status_code == 202
            erasure_id = r.json()["erasure"]["erasure_id"]
            time.sleep(0.3)
            os.kill(serve.popen.pid, signal.SIGKILL)  # the sink and the erasure with it
            serve.popen.wait(10)
        wh = ChdbWarehouse(settings.warehouse_path)
        try:
            (pending,) = rows(
                wh.query("SELECT count() FROM erasures FINAL WHERE completed_at IS NULL")
            )[0]
        finally:
            wh.close()
        assert pending == 1, "the erasure had finished before the kill: make the owner larger"
        serve = start_serve(settings)
        url = wait_for_service(settings, serve)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
            deadline, erasure = time.monotonic() + 120, {}
            while time.monotonic() < deadline:
                erasure = api.get(f"/v1/erasures/{erasure_id}").json()["erasure"]
                if erasure["status"] == "completed":
                    break
                time.sleep(0.5)
            assert erasure["status"] == "completed", erasure
    finally:
        worker.stop()
        serve.stop()
    others = [v for v in fleet if v.owner_id != owner]
    wh = open_warehouse(settings)
    try:
        (left,) = rows(
            wh.query("SELECT count() FROM samples WHERE owner_id = {o:String}", {"o": owner})
        )[0]
        kept = dict(rows(wh.query("SELECT vin, count() FROM samples GROUP BY vin")))
    finally:
        wh.close()
    assert left == 0
    assert kept == {v.vin: published.truth.vehicles[v.vin].samples for v in others}

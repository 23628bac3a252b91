"""A worker whose fetcher stops delivering restarts itself, and nothing is lost."""

from __future__ import annotations

import uuid

import pytest

from producers.publish import publish_fleet, register_fleet
from producers.simulator import build_fleet
from sinks.warehouse import open_warehouse, rows
from vtp.pipeline import read_outcomes, start_process, start_sink, wait_drained
from vtp.topics import create_topics

pytestmark = pytest.mark.integration


def test_a_stalled_worker_restarts_in_place_and_the_pipeline_drains(base_settings, tmp_path):
    settings = base_settings.with_(
        data_dir=tmp_path, topic_prefix=f"stall-{uuid.uuid4().hex[:6]}", worker_stall_s=12.0,
        sink_batch_messages=200, sink_flush_ms=300,
    )  # fmt: skip
    create_topics(settings)
    fleet = build_fleet(9, owners=3, vehicles=4, regions=settings.regions)
    register_fleet(settings, fleet)
    worker = start_process(settings, "worker", module="tests.integration.stalling_worker")
    sinks = [start_sink(settings, r) for r in settings.regions]
    processes = [worker, *sinks]
    try:
        published = publish_fleet(settings, fleet, seed=9, duration_s=20 * 60)
        assert published.report.ok
        assert wait_drained(settings, processes, timeout=240), "the stalled worker never recovered"
    finally:
        for p in processes:
            p.stop()
    log = worker.log_path.read_text()
    assert "restarting the worker in place" in log
    assert log.count("[^Worker]: Ready") >= 2  # the same process, started again
    # before restarting it logged what it was doing: offsets, fetch positions, producer
    for line in ("flow: ", "fetch: ", "producer: in_flight=", "TRACEBACK OF ALL RUNNING AGENT"):
        assert line in log
    stored = 0
    for region in settings.regions:
        wh = open_warehouse(settings, region)
        try:
            stored += rows(wh.query("SELECT count() FROM uploads"))[0][0]
        finally:
            wh.close()
    outcomes = read_outcomes(settings)
    assert stored == published.uploads and outcomes.deadlettered_total == 0

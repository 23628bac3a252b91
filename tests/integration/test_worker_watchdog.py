"""A worker whose fetcher stops delivering restarts itself, and nothing is lost."""

from __future__ import annotations

import pytest

from producers.publish import publish_fleet, register_fleet
from producers.simulator import build_fleet
from sinks.warehouse import open_warehouse, rows
from vtp.pipeline import read_outcomes, start_process, start_sink, wait_drained

pytestmark = pytest.mark.integration


def test_a_stalled_worker_restarts_in_place_and_the_pipeline_drains(region_stack):
    settings = region_stack(
        "cn", "stall", worker_stall_s=12.0, sink_batch_messages=200, sink_flush_ms=300
    )
    fleet = build_fleet(9, owners=3, vehicles=4, regions=("cn",))
    register_fleet(settings, fleet)
    worker = start_process(settings, "worker", module="tests.integration.stalling_worker")
    processes = [worker, start_sink(settings)]
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
    wh = open_warehouse(settings)
    try:
        stored = rows(wh.query("SELECT count() FROM uploads"))[0][0]
    finally:
        wh.close()
    outcomes = read_outcomes(settings)
    assert stored == published.uploads and outcomes.deadlettered_total == 0

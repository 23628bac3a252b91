"""A worker whose fetcher stops delivering restarts itself, and nothing is lost; a worker
that is merely catching up is left alone."""

from __future__ import annotations

import time

import pytest

from producers.publish import DEFAULT_START_MS, publish_fleet, register_fleet
from producers.sdk import publish_registrations
from producers.simulator import build_fleet
from schemas.registry import Period, Registration
from vtp.harness import (
    group_position,
    read_outcomes,
    start_sink,
    start_worker,
    stored_uploads,
    wait_drained,
)

pytestmark = pytest.mark.e2e

LATER_MS = DEFAULT_START_MS + 3600_000  # a second stretch of driving, an hour on


def test_a_stalled_worker_restarts_in_place_and_the_pipeline_drains(region_stack):
    settings = region_stack(
        "cn", "stall", worker_stall_s=12.0, sink_batch_messages=200, sink_flush_ms=300
    )
    fleet = build_fleet(9, owners=3, vehicles=4, regions=("cn",))
    register_fleet(settings, fleet)
    worker = start_worker(settings, module="tests.e2e.stalling_worker")
    processes = [worker, start_sink(settings)]
    try:
        first = publish_fleet(settings, fleet, seed=9, duration_s=10 * 60)
        assert first.report.ok
        # The worker's fetcher stops once it has delivered uploads; what comes after waits.
        deadline = time.monotonic() + 120
        group, uploads = settings.topics.worker_app, [settings.topics.uploads]
        while time.monotonic() < deadline and group_position(settings, group, uploads)[0] == 0:
            time.sleep(0.2)
        later = publish_fleet(settings, fleet, seed=19, duration_s=10 * 60, start_ms=LATER_MS)
        assert later.report.ok
        assert wait_drained(settings, processes, timeout=240), "the stalled worker never recovered"
    finally:
        for p in processes:
            p.stop()
    log = worker.log_path.read_text()
    assert "exiting for the supervisor to restart the worker" in log
    assert (
        worker.restarts >= 1 and "[supervisor] worker-cn exited with 75; starting it again" in log
    )
    assert log.count("[^Worker]: Ready") >= 2
    # before restarting it logged what it was doing: offsets, fetch positions, producer
    for line in ("flow: ", "fetch: ", "producer: in_flight=", "TRACEBACK OF ALL RUNNING AGENT"):
        assert line in log
    stored = stored_uploads(settings)
    outcomes = read_outcomes(settings)
    assert stored == first.uploads + later.uploads and outcomes.deadlettered_total == 0


def test_a_worker_catching_up_with_a_large_registry_is_not_restarted(region_stack):
    """Uploads wait for the registry (the gate) far longer than VTP_WORKER_STALL_S; the
    watchdog sees the registry moving and leaves the worker alone."""
    settings = region_stack(
        "cn",
        "catchup",
        worker_stall_s=3.0,
        state_checkpoint_s=1.0,
        sink_batch_messages=200,
        sink_flush_ms=300,
    )
    fleet = build_fleet(10, owners=3, vehicles=4, regions=("cn",))
    register_fleet(settings, fleet)
    others = [
        Registration(
            f"LSV{i:014d}",
            (Period(0, f"owner-{i % 5000}", "cn"),),
            "Model 3",
            60.0,
            "Asia/Shanghai",
            1,
        )
        for i in range(150_000)
    ]
    assert publish_registrations(settings.bootstrap(), settings.topics.vehicles, others).ok
    published = publish_fleet(settings, fleet, seed=10, duration_s=10 * 60)  # waiting already
    assert published.report.ok
    processes = [start_worker(settings), start_sink(settings)]
    try:
        assert wait_drained(settings, processes, timeout=300)
    finally:
        for p in processes:
            p.stop()
    log = processes[0].log_path.read_text()
    assert "waiting for the vehicle registry to catch up (10 s)" in log  # longer than the stall
    assert processes[0].restarts == 0 and "[supervisor]" not in log
    assert log.count("[^Worker]: Ready") == 1
    stored = stored_uploads(settings)
    assert stored == published.uploads and read_outcomes(settings).quarantined_total == 0

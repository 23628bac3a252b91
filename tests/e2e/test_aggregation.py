"""Trips, charges and daily summaries through the real pipeline, against ground truth.

The fleet's uploads reach Kafka shuffled within the allowed lateness, one in ten is
sent twice, the worker is SIGKILLed and restarted in the middle of the run, and at the
end one straggler arrives whose samples are hours older than what was aggregated.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid

import pytest

from producers.publish import register_fleet
from producers.sdk import TelemetryPublisher
from producers.simulator import build_fleet, new_truth, simulate
from vtp.core.warehouse import open_warehouse, rows
from vtp.harness import (
    group_position,
    pipeline_positions,
    read_outcomes,
    start_sink,
    start_worker,
    wait_drained,
)
from vtp.oracle import compare

pytestmark = pytest.mark.e2e

STRAGGLER_SEQ = 10_000_000
HOURS = float(os.environ.get("VTP_TEST_AGG_HOURS", "10"))
START_MS = 1_794_060_000_000  # 2026-11-07T14:00Z: crosses midnight in Shanghai and in Berlin


def _straggler(upload: dict) -> dict:
    """A new upload whose samples fall between ones that were aggregated hours ago."""
    return {
        **upload,
        "upload_id": str(uuid.uuid4()),
        "samples": [
            {**s, "event_time_ms": s["event_time_ms"] + 1, "seq": s["seq"] + STRAGGLER_SEQ}
            for s in upload["samples"]
        ],
    }


@pytest.fixture(scope="module")
def aggregated(region_stack):
    settings = region_stack("eu", "agg", sink_batch_messages=200, sink_flush_ms=300)
    fleet = build_fleet(31, owners=6, vehicles=10, regions=("eu",))
    register_fleet(settings, fleet)
    truth = new_truth(fleet)
    uploads = list(
        simulate(fleet, seed=31, start_ms=START_MS, duration_s=HOURS * 3600, truth=truth)
    )
    rng = random.Random(3)
    resent = rng.sample(uploads, len(uploads) // 10)
    # Out of order by up to 90 s of event time (the allowed lateness is 120 s).
    shuffled = sorted(uploads + resent, key=lambda u: u["sent_at_ms"] + rng.uniform(0, 90_000))
    worker = start_worker(settings)
    sinks = [start_sink(settings)]
    processes = [worker, *sinks]
    kills = 0
    try:
        publisher = TelemetryPublisher(
            settings.bootstrap(), settings.topics.uploads, schema_version=1
        )
        half = len(shuffled) // 2
        for upload in shuffled[:half]:
            publisher.publish_upload(upload)
        assert publisher.flush(60).ok
        # Kill the worker once it has aggregated part of the first half, then restart it.
        group, validated = settings.topics.worker_app, [settings.topics.validated]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and group_position(settings, group, validated)[0] < 500:
            time.sleep(0.2)
        os.kill(worker.popen.pid, signal.SIGKILL)
        worker.popen.wait(10)
        kills += 1
        worker = start_worker(settings)
        processes = [worker, *sinks]
        for upload in shuffled[half:]:
            publisher.publish_upload(upload)
        straggler = _straggler(uploads[0])
        publisher.publish_upload(straggler)
        assert publisher.flush(60).ok
        assert wait_drained(settings, processes, timeout=400), pipeline_positions(settings)
    finally:
        for p in processes:
            p.stop()
    comparisons = {}
    wh = open_warehouse(settings)
    try:
        comparisons["eu"] = compare(wh, truth, [v.vin for v in fleet])
        straggler_rows = wh.query(
            "SELECT count() FROM samples WHERE vin = {vin:String} AND seq >= {seq:UInt64}",
            {"vin": straggler["vin"], "seq": STRAGGLER_SEQ},
        )
    finally:
        wh.close()
    return {
        "comparisons": comparisons,
        "straggler": (len(straggler["samples"]), rows(straggler_rows)[0][0]),
        "outcomes": read_outcomes(settings),
        "kills": kills,
        "resent": len(resent),
    }


def test_trips_charges_and_days_match_the_ground_truth(aggregated):
    for region, c in aggregated["comparisons"].items():
        print(f"\n{region}:\n{c.table()}")
        assert not c.problems, c.problems[:10]
        assert c.trips_found == c.trips_expected > 0
        assert c.charges_found == c.charges_expected
        assert (
            c.days_found == c.days_expected >= c.vehicles * 2
        )  # every vehicle crossed a local midnight
        assert c.max_trip_distance_error <= 0.005 and c.max_day_distance_error <= 0.005
        assert c.max_trip_energy_error <= 0.02 and c.max_charge_energy_error <= 0.02
        assert c.max_day_energy_error <= 0.02
        assert (
            c.max_start_end_offset_ms <= 10_000
        )  # one sample interval (charging samples are 10 s apart)


def test_resends_were_refused(aggregated):
    assert aggregated["kills"] == 1
    assert aggregated["outcomes"].deadlettered["duplicate_upload"] == aggregated["resent"]


def test_the_straggler_is_dead_lettered_too_late_and_its_samples_still_stored(aggregated):
    # The aggregates still match the truth (test above): the straggler changed nothing.
    assert aggregated["outcomes"].too_late == 1
    sent, stored = aggregated["straggler"]
    assert stored == sent > 0

"""The whole pipeline on a real broker: worker and sinks run as the processes users run.

One module-scoped run feeds several checks; the crash test has its own run.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request

import pytest
from confluent_kafka import Producer

from producers.faults import fault_messages
from producers.publish import DEFAULT_START_MS, publish_fleet, register_fleet
from producers.sdk import TelemetryPublisher
from producers.simulator import build_fleet
from schemas import default_store
from sinks.warehouse import open_warehouse, rows
from vtp.pipeline import (
    NotDrained,
    group_position,
    pipeline_lag,
    read_outcomes,
    start_process,
    start_sink,
    start_worker,
    topic_message_count,
    wait_drained,
)
from vtp.topics import create_topics

pytestmark = pytest.mark.integration
V2_SAMPLES = 5


def make_settings(base_settings, tmp_path_factory, name, **overrides):
    from uuid import uuid4

    options = {"sink_batch_messages": 40, "sink_flush_ms": 300, **overrides}
    settings = base_settings.with_(
        data_dir=tmp_path_factory.mktemp(name), topic_prefix=f"{name}-{uuid4().hex[:6]}", **options
    )
    create_topics(settings)
    return settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """Prometheus text from a running process: {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def warehouse_rows(settings, region, sql, params=None):
    wh = open_warehouse(settings, region)
    try:
        return rows(wh.query(sql, params))
    finally:
        wh.close()


@pytest.fixture(scope="module")
def run(base_settings, tmp_path_factory):
    settings = make_settings(base_settings, tmp_path_factory, "e2e")
    fleet = build_fleet(11, owners=12, vehicles=21, regions=settings.regions)
    registered, unregistered = fleet[:-1], fleet[-1:]
    register_fleet(settings, registered)
    ports = {name: free_port() for name in ["worker", *settings.regions]}
    processes = [start_worker(settings, ports["worker"])] + [
        start_sink(settings, r, ports[r]) for r in settings.regions
    ]
    try:
        publisher = TelemetryPublisher(
            settings.bootstrap(), settings.topics.uploads, schema_version=1
        )
        first = publish_fleet(settings, fleet, seed=11, duration_s=240, publisher=publisher)
        faults = fault_messages(
            registered[0].vin,
            unregistered[0].vin,
            first.first_uploads[registered[0].vin],
            DEFAULT_START_MS,
        )
        for fault in faults:
            publisher.publish_raw(fault.key, fault.value, fault.reason)
        # A gateway on newer firmware writes schema v2 (one more optional field).
        v2_vehicle = registered[1]
        v2_publisher = TelemetryPublisher(
            settings.bootstrap(), settings.topics.uploads, schema_version=2
        )
        for i in range(V2_SAMPLES):
            v2_publisher.add_sample(
                v2_vehicle.vin,
                {"event_time_ms": int(time.time() * 1000) - 60_000 + i * 1000, "seq": 10**9 + i,
                 "speed": 0.0, "gear": "PARK", "cabin_temperature": 21.5},
            )  # fmt: skip
        v2_report = v2_publisher.close(30)
        assert v2_report.ok
        # More good data after the bad: the pipeline must keep going.
        later = publish_fleet(
            settings, fleet, seed=12, duration_s=120,
            start_ms=DEFAULT_START_MS + 3_600_000, publisher=publisher,
        )  # fmt: skip
        # A message tagged for the wrong region, and one with no tag, straight into the
        # EU sink's topic: the sink itself must refuse them.
        cn_vehicle = next(v for v in registered if v.region == "cn")
        cn_value = default_store().encode(
            {"vin": cn_vehicle.vin, "upload_id": "smuggled", "sent_at_ms": DEFAULT_START_MS,
             "gateway_firmware": "x", "samples": [{"event_time_ms": DEFAULT_START_MS, "seq": 1}]},
            default_store().get("VehicleUpload", 1),
        )  # fmt: skip
        smuggler = Producer({"bootstrap.servers": settings.bootstrap()})
        smuggler.produce(settings.topics.validated("eu"), key=cn_vehicle.vin.encode(), value=cn_value,
                         headers=[("vtp-region", b"cn"), ("vtp-owner", cn_vehicle.owner_id.encode()),
                                  ("vtp-source", b"smuggled:0:1")])  # fmt: skip
        smuggler.produce(settings.topics.validated("eu"), key=b"x", value=cn_value,
                         headers=[("vtp-source", b"smuggled:0:2")])  # fmt: skip
        assert smuggler.flush(10) == 0
        report = publisher.flush(60)
        assert report.ok, report
        assert wait_drained(settings, processes, timeout=300), "pipeline did not drain"
        metrics = {name: scrape(port) for name, port in ports.items()}
    finally:
        for p in processes:
            p.stop()
    return {
        "settings": settings,
        "fleet": fleet,
        "registered": registered,
        "unregistered": unregistered,
        "truths": [first.truth, later.truth],
        "produced": report.delivered + v2_report.delivered,
        "v2_vehicle": v2_vehicle,
        "faults": faults,
        "outcomes": read_outcomes(settings),
        "metrics": metrics,
    }


def test_counts_reconcile_exactly(run):
    settings, outcomes = run["settings"], run["outcomes"]
    stored = sum(
        warehouse_rows(settings, r, "SELECT count() FROM uploads")[0][0] for r in settings.regions
    )
    raw_messages = topic_message_count(settings, settings.topics.uploads)
    assert raw_messages == run["produced"]
    # the two smuggled messages never passed through the uploads topic
    assert outcomes.deadlettered["residency_mismatch"] == 1
    assert outcomes.deadlettered["untagged"] == 1
    from_uploads = outcomes.deadlettered_total - 2
    assert run["produced"] == stored + from_uploads + outcomes.quarantined_total


def test_every_bad_message_lands_with_its_reason(run):
    outcomes = run["outcomes"]
    for fault in run["faults"]:
        bucket = (
            outcomes.deadlettered if fault.destination == "deadletter" else outcomes.quarantined
        )
        assert bucket[fault.reason] >= 1, (fault.reason, outcomes)
    # the unregistered vehicle's whole fleet traffic is quarantined, nothing of it stored
    unregistered_uploads = sum(
        t.vehicles[run["unregistered"][0].vin].uploads for t in run["truths"]
    )
    assert outcomes.quarantined["unknown_vin"] == unregistered_uploads + 1


def test_every_registered_vehicle_has_exactly_its_samples(run):
    settings = run["settings"]
    stored = {}
    for region in settings.regions:
        for vin, n, distinct in warehouse_rows(
            settings, region, "SELECT vin, count(), uniqExact(seq) FROM samples GROUP BY vin"
        ):
            assert n == distinct, f"duplicate samples for {vin}"
            stored[vin] = n
    expected = {
        v.vin: sum(t.vehicles[v.vin].samples for t in run["truths"]) for v in run["registered"]
    }
    expected[run["v2_vehicle"].vin] += V2_SAMPLES
    expected = {vin: n for vin, n in expected.items() if n}
    assert stored == expected


def test_v2_uploads_flow_through_with_the_new_field(run):
    vehicle = run["v2_vehicle"]
    found = warehouse_rows(
        run["settings"], vehicle.region,
        "SELECT schema_version, count(), min(cabin_temperature) FROM samples WHERE vin = {v:String} "
        "GROUP BY schema_version ORDER BY schema_version",
        {"v": vehicle.vin},
    )  # fmt: skip
    assert found[-1] == (2, V2_SAMPLES, 21.5)
    assert found[0][0] == 1 and found[0][2] is None  # v1 rows read with the default


def test_residency_no_vehicle_in_the_other_regions_warehouse(run):
    settings = run["settings"]
    region_of = {v.vin: v.region for v in run["fleet"]}
    for region in settings.regions:
        found = warehouse_rows(settings, region, "SELECT DISTINCT vin, region FROM samples")
        assert found, f"nothing stored in {region}"
        for vin, tagged in found:
            assert region_of[vin] == region and tagged == region, (vin, region)
        owners = warehouse_rows(settings, region, "SELECT DISTINCT owner_id FROM uploads")
        assert {o for (o,) in owners} <= {v.owner_id for v in run["fleet"] if v.region == region}


def test_owner_report_cli_prints_the_owners_vehicles(run):
    import subprocess
    import sys

    from vtp.pipeline import settings_env

    settings = run["settings"]
    vehicle = run["registered"][0]
    out = subprocess.run(
        [sys.executable, "-m", "vtp.cli", "owner", "report", vehicle.owner_id, "--region", vehicle.region],
        env=settings_env(settings), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert vehicle.vin in out.stdout and "driven" in out.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "vtp.cli", "owner", "report", "owner-nobody", "--region", vehicle.region],
        env=settings_env(settings), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2 and "no data for owner" in missing.stderr


def test_sink_killed_mid_run_leaves_exactly_the_expected_rows(base_settings, tmp_path_factory):
    settings = make_settings(base_settings, tmp_path_factory, "crash", sink_batch_messages=15)
    fleet = build_fleet(5, owners=10, vehicles=16, regions=settings.regions)
    register_fleet(settings, fleet)
    worker = start_worker(settings)
    sinks = {r: start_sink(settings, r) for r in settings.regions}
    kills = 0
    group, topics = f"{settings.topic_prefix}-sink-cn", [settings.topics.validated("cn")]
    try:
        published = publish_fleet(settings, fleet, seed=5, duration_s=900)
        assert published.report.ok
        # SIGKILL the CN sink each time it has made progress but still has work, and
        # restart it: most kills land between a batch's insert and its commit.
        committed_before, deadline = 0, time.monotonic() + 240
        while kills < 4 and time.monotonic() < deadline:
            committed, high = group_position(settings, group, topics)
            if high and committed >= high and pipeline_lag(settings) == 0:
                break
            if committed > committed_before:
                time.sleep(0.05 * kills)  # vary where in the batch cycle the kill lands
                os.kill(sinks["cn"].popen.pid, signal.SIGKILL)
                sinks["cn"].popen.wait(10)
                kills += 1
                committed_before = committed
                sinks["cn"] = start_sink(settings, "cn")
            time.sleep(0.1)
        assert wait_drained(settings, [worker, *sinks.values()], timeout=300)
    finally:
        for p in [worker, *sinks.values()]:
            p.stop()
    assert kills >= 1, "the pipeline drained before the sink could be killed"
    expected = {v.vin: published.truth.vehicles[v.vin] for v in fleet if v.region == "cn"}
    ((n, distinct),) = warehouse_rows(
        settings, "cn", "SELECT count(), uniqExact(vin, seq) FROM samples"
    )
    assert n == distinct == sum(t.samples for t in expected.values())
    ((ups, distinct_ups),) = warehouse_rows(
        settings, "cn", "SELECT count(), uniqExact(upload_id) FROM uploads"
    )
    assert ups == distinct_ups == sum(t.uploads for t in expected.values())


def test_each_process_serves_prometheus_metrics(run):
    settings, metrics = run["settings"], run["metrics"]
    worker = metrics["worker"]
    assert worker["vtp_uploads_in_total"] == run["produced"]
    assert (
        worker['vtp_quarantined_total{reason="unknown_vin"}']
        == run["outcomes"].quarantined["unknown_vin"]
    )
    assert worker['vtp_deadlettered_total{reason="malformed_avro",stage="validate"}'] == 1
    for region in settings.regions:
        sink = metrics[region]
        (samples,) = warehouse_rows(settings, region, "SELECT count() FROM samples")[0]
        assert sink[f'vtp_sink_samples_stored_total{{region="{region}"}}'] == samples
        assert sink[f'vtp_sink_batch_messages_count{{region="{region}"}}'] >= 1
        assert f'vtp_sink_insert_seconds_bucket{{le="+Inf",region="{region}"}}' in sink
    assert metrics["eu"]['vtp_deadlettered_total{reason="residency_mismatch",stage="sink"}'] == 1
    lag = [k for k in metrics["cn"] if k.startswith("vtp_consumer_lag_messages")]
    assert lag, "the sink reports consumer lag"


def test_worker_reports_its_consumer_lag(run):
    lag = {
        k: v
        for k, v in run["metrics"]["worker"].items()
        if k.startswith("vtp_consumer_lag_messages")
    }
    uploads = run["settings"].topics.uploads
    assert any(f'topic="{uploads}"' in k for k in lag), lag


def test_a_pipeline_that_does_not_drain_says_where_it_stands(base_settings, tmp_path_factory):
    settings = make_settings(base_settings, tmp_path_factory, "undrained")
    producer = Producer({"bootstrap.servers": settings.bootstrap()})
    for i in range(3):
        producer.produce(settings.topics.uploads, key=b"WBA00000000000001", value=b"x%d" % i)
    assert producer.flush(30) == 0
    sink = start_sink(settings, "cn")  # no worker: nothing reads the uploads
    try:
        with pytest.raises(NotDrained) as waited:
            wait_drained(settings, [sink], timeout=3)
    finally:
        sink.stop()
    report = str(waited.value)
    assert "not drained after 3 s" in report
    assert f"{settings.topic_prefix}-validate {settings.topics.uploads}: 0/3" in report
    assert f"--- last lines of {sink.log_path} ---" in report

    refused = start_process(settings, "sink-xx", "sink", "--region", "xx")
    try:
        with pytest.raises(NotDrained) as exited:
            wait_drained(settings, [refused], timeout=60)
    finally:
        refused.stop()
    # the process's own last words come with it
    assert "sink-xx exited with 1:\nvtp: region 'xx' is not one of" in str(exited.value)

"""A region's whole pipeline on a real broker: its worker and sink run as the processes
users run. Vehicles of the other region that reach this region's door, by mistake or
on purpose, are refused here and stored nowhere.

One module-scoped run feeds several checks; the crash test has its own run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections import Counter

import pytest
from confluent_kafka import Producer

from producers.faults import fault_messages
from producers.publish import DEFAULT_START_MS, flush_all, publish_fleet, register_fleet
from producers.sdk import TelemetryPublisher
from producers.simulator import build_fleet
from schemas import default_store
from vtp.core.warehouse import open_warehouse, rows
from vtp.harness import (
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

pytestmark = pytest.mark.e2e
V2_SAMPLES = 5
QUICK = {"sink_batch_messages": 40, "sink_flush_ms": 300}


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


def warehouse_rows(settings, sql, params=None):
    wh = open_warehouse(settings)
    try:
        return rows(wh.query(sql, params))
    finally:
        wh.close()


def smuggle(settings, vehicle, tag: str | None, source: str, event_ms: int = DEFAULT_START_MS):
    """A message straight into the region's validated topic, past the worker."""
    store = default_store()
    value = store.encode(
        {
            "vin": vehicle.vin,
            "upload_id": f"smuggled-{source}",
            "sent_at_ms": event_ms,
            "gateway_firmware": "x",
            "samples": [{"event_time_ms": event_ms, "seq": 1}],
        },
        store.get("VehicleUpload", 1),
    )
    headers = [("vtp-source", source.encode())]
    if tag:
        headers.append(("vtp-region", tag.encode()))
    producer = Producer({"bootstrap.servers": settings.bootstrap()})
    producer.produce(
        settings.topics.validated, key=vehicle.vin.encode(), value=value, headers=headers
    )
    assert producer.flush(10) == 0


@pytest.fixture(scope="module")
def run(region_stack):
    settings = region_stack("eu", "e2e", **QUICK)
    fleet = build_fleet(11, owners=12, vehicles=21)
    eu = [v for v in fleet if v.region == "eu"]
    cn = [v for v in fleet if v.region == "cn"]
    registered, unregistered = eu[:-1], eu[-1:]
    register_fleet(settings, registered)
    ports = {"worker": free_port(), "sink": free_port()}
    processes = [start_worker(settings, ports["worker"]), start_sink(settings, ports["sink"])]
    try:
        publisher = TelemetryPublisher(
            settings.bootstrap(), settings.topics.uploads, schema_version=1
        )
        # Every vehicle at the EU door, CN ones too (misprovisioned, or probing).
        both = {"eu": publisher, "cn": publisher}
        first = publish_fleet(settings, fleet, seed=11, duration_s=240, publishers=both)
        faults = fault_messages(
            registered[0].vin,
            unregistered[0].vin,
            first.first_uploads[registered[0].vin],
            DEFAULT_START_MS,
        )
        for fault in faults:
            publisher.publish_raw(fault.key, fault.value, fault.reason, fault.created_ms)
        # A gateway on newer firmware writes schema v2 (one more optional field).
        v2_vehicle = registered[1]
        v2_publisher = TelemetryPublisher(
            settings.bootstrap(), settings.topics.uploads, schema_version=2
        )
        for i in range(V2_SAMPLES):
            v2_publisher.add_sample(
                v2_vehicle.vin,
                {
                    "event_time_ms": int(time.time() * 1000) - 60_000 + i * 1000,
                    "seq": 10**9 + i,
                    "speed": 0.0,
                    "gear": "PARK",
                    "cabin_temperature": 21.5,
                },
            )
        v2_report = v2_publisher.close(30)
        assert v2_report.ok
        # More good data after the bad: the pipeline must keep going.
        later = publish_fleet(
            settings,
            fleet,
            seed=12,
            duration_s=120,
            start_ms=DEFAULT_START_MS + 3_600_000,
            publishers=both,
        )
        # Straight into the sink's topic: tagged for the other region, not tagged, and
        # tagged "eu" for a vehicle the EU registry does not hold: the sink decides
        # with its own copy of the registry, not with the tag.
        smuggle(settings, cn[0], "cn", "smuggled:0:1")
        smuggle(settings, registered[2], None, "smuggled:0:2")
        smuggle(settings, cn[1], "eu", "smuggled:0:3")
        # and an aggregate naming an owner this vehicle never had here
        forged_trip = {
            "kind": "trip",
            "vin": registered[3].vin,
            "owner_id": "intruder",
            "region": "eu",
            "final": True,
            "version": 1,
            "start_ms": DEFAULT_START_MS,
            "end_ms": DEFAULT_START_MS + 60_000,
            "duration_s": 60.0,
            "distance_km": 1.0,
            "avg_speed_kmh": 60.0,
            "max_speed_kmh": 60.0,
        }
        producer = Producer({"bootstrap.servers": settings.bootstrap()})
        producer.produce(
            settings.topics.aggregates,
            key=registered[3].vin.encode(),
            value=json.dumps(forged_trip).encode(),
        )
        # and aggregates that fit no table: dead-lettered one by one, the sink goes on
        for odd in (
            {**forged_trip, "owner_id": registered[3].owner_id, "distance_km": "far"},
            {**forged_trip, "vin": {"not": "a vin"}},
            {"kind": "teleport"},
        ):
            producer.produce(
                settings.topics.aggregates,
                key=registered[3].vin.encode(),
                value=json.dumps(odd).encode(),
            )
        assert producer.flush(10) == 0
        report = flush_all({"eu": publisher})
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
        "cn": cn,
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
    (stored,) = warehouse_rows(settings, "SELECT uniqExact(upload_id) FROM uploads")[0]
    raw_messages = topic_message_count(settings, settings.topics.uploads)
    assert raw_messages == run["produced"]
    # the four smuggled messages never passed through the uploads topic
    assert outcomes.deadlettered["residency_mismatch"] == 1
    assert outcomes.deadlettered["untagged"] == 1
    assert outcomes.deadlettered["not_registered_at_that_time"] == 1
    assert outcomes.deadlettered["malformed_aggregate"] == 3
    from_uploads = outcomes.deadlettered_total - 6 + outcomes.quarantined_total - 1
    assert run["produced"] == stored + from_uploads


def test_every_bad_message_lands_with_its_reason(run):
    outcomes = run["outcomes"]
    expected = Counter((f.destination, f.reason) for f in run["faults"])
    assert expected[("deadletter", "clock_skew")] == 2  # one of them a day ahead, CreateTime
    for (destination, reason), n in expected.items():
        bucket = outcomes.deadlettered if destination == "deadletter" else outcomes.quarantined
        assert bucket[reason] >= n, (reason, outcomes)
    # only the faults were dead-lettered by the worker: the fleet's own data was fine
    worker_reasons = {r for (d, r) in expected if d == "deadletter"}
    assert set(outcomes.deadlettered) - worker_reasons <= {
        "residency_mismatch",
        "untagged",
        "not_registered_at_that_time",
        "malformed_aggregate",
    }
    # the unregistered vehicle's traffic and every CN vehicle's are quarantined here
    strangers = [run["unregistered"][0], *run["cn"]]
    uploads = sum(t.vehicles[v.vin].uploads for t in run["truths"] for v in strangers)
    # + the fault for the unregistered one, + the one smuggled past the worker
    assert outcomes.quarantined["unknown_vin"] == uploads + 2


def test_the_sink_checks_residency_with_its_own_registry_not_the_workers_tag(run):
    settings, cn = run["settings"], run["cn"]
    found = warehouse_rows(
        settings,
        "SELECT count() FROM samples WHERE vin IN {v:Array(String)}",
        {"v": [v.vin for v in cn]},
    )
    assert found == [(0,)]
    assert run["metrics"]["sink"]['vtp_quarantined_total{reason="unknown_vin"}'] == 1
    intruder = warehouse_rows(settings, "SELECT count() FROM trips WHERE owner_id = 'intruder'")
    assert intruder == [(0,)]


def test_every_registered_vehicle_has_exactly_its_samples(run):
    stored = {}
    for vin, n, distinct in warehouse_rows(
        run["settings"], "SELECT vin, count(), uniqExact(seq) FROM samples GROUP BY vin"
    ):
        assert n == distinct, f"duplicate samples for {vin}"
        stored[vin] = n
    expected = {
        v.vin: sum(t.vehicles[v.vin].samples for t in run["truths"]) for v in run["registered"]
    }
    expected[run["v2_vehicle"].vin] += V2_SAMPLES
    assert stored == {vin: n for vin, n in expected.items() if n}


def test_v2_uploads_flow_through_with_the_new_field(run):
    vehicle = run["v2_vehicle"]
    found = warehouse_rows(
        run["settings"],
        "SELECT schema_version, count(), min(cabin_temperature) FROM samples WHERE vin = {v:String} "
        "GROUP BY schema_version ORDER BY schema_version",
        {"v": vehicle.vin},
    )
    assert found[-1] == (2, V2_SAMPLES, 21.5)
    assert found[0][0] == 1 and found[0][2] is None  # v1 rows read with the default


def test_only_this_regions_owners_and_vehicles_are_stored(run):
    settings = run["settings"]
    vins = {v for (v,) in warehouse_rows(settings, "SELECT DISTINCT vin FROM samples")}
    owners = {o for (o,) in warehouse_rows(settings, "SELECT DISTINCT owner_id FROM uploads")}
    assert vins and vins <= {v.vin for v in run["registered"]}
    assert owners <= {v.owner_id for v in run["registered"]}
    assert warehouse_rows(settings, "SELECT DISTINCT region FROM samples") == [("eu",)]


def test_owner_report_cli_prints_the_owners_vehicles(run):
    import subprocess
    import sys

    from vtp.harness import settings_env

    settings = run["settings"]
    vehicle = run["registered"][0]
    out = subprocess.run(
        [sys.executable, "-m", "vtp.cli", "owner", "report", vehicle.owner_id],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert vehicle.vin in out.stdout and "driven" in out.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "vtp.cli", "owner", "report", "owner-nobody"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no data for owner" in missing.stderr


def test_sink_killed_mid_run_leaves_exactly_the_expected_rows(region_stack):
    settings = region_stack("cn", "crash", sink_batch_messages=15, sink_flush_ms=300)
    fleet = [v for v in build_fleet(5, owners=10, vehicles=16) if v.region == "cn"]
    register_fleet(settings, fleet)
    worker, sink = start_worker(settings), start_sink(settings)
    kills = 0
    group, topics = settings.topics.sink_group, [settings.topics.validated]
    try:
        published = publish_fleet(settings, fleet, seed=5, duration_s=900)
        assert published.report.ok
        # SIGKILL the sink each time it has made progress but still has work, and
        # restart it: most kills land between a batch's insert and its commit.
        committed_before, deadline = 0, time.monotonic() + 240
        while kills < 4 and time.monotonic() < deadline:
            committed, high = group_position(settings, group, topics)
            if high and committed >= high and pipeline_lag(settings) == 0:
                break
            if committed > committed_before:
                time.sleep(0.05 * kills)  # vary where in the batch cycle the kill lands
                os.kill(sink.popen.pid, signal.SIGKILL)
                sink.popen.wait(10)
                kills += 1
                committed_before = committed
                sink = start_sink(settings)
            time.sleep(0.1)
        assert wait_drained(settings, [worker, sink], timeout=300)
    finally:
        for p in [worker, sink]:
            p.stop()
    assert kills >= 1, "the pipeline drained before the sink could be killed"
    expected = published.truth.vehicles
    ((n, distinct),) = warehouse_rows(settings, "SELECT count(), uniqExact(vin, seq) FROM samples")
    assert n == distinct == sum(t.samples for t in expected.values())
    ((ups, distinct_ups),) = warehouse_rows(
        settings, "SELECT count(), uniqExact(upload_id) FROM uploads"
    )
    assert ups == distinct_ups == sum(t.uploads for t in expected.values())


def test_each_process_serves_prometheus_metrics(run):
    metrics = run["metrics"]
    worker = metrics["worker"]
    assert worker["vtp_uploads_in_total"] == run["produced"]
    assert (
        worker['vtp_quarantined_total{reason="unknown_vin"}']
        == run["outcomes"].quarantined["unknown_vin"] - 1  # one more came from the sink
    )
    assert worker['vtp_deadlettered_total{reason="malformed_avro",stage="validate"}'] == 1
    sink = metrics["sink"]
    (samples,) = warehouse_rows(run["settings"], "SELECT count() FROM samples")[0]
    assert sink['vtp_sink_samples_stored_total{region="eu"}'] == samples
    assert sink['vtp_sink_batch_messages_count{region="eu"}'] >= 1
    # every upload routed to eu, and the three smuggled past the worker, went through one
    # sink batch (a batch message weighs as many uploads as it carries)
    assert (
        sink['vtp_sink_batch_uploads_sum{region="eu"}']
        == worker['vtp_uploads_routed_total{region="eu"}'] + 3
    )
    assert 'vtp_sink_insert_seconds_bucket{le="+Inf",region="eu"}' in sink
    assert sink['vtp_deadlettered_total{reason="residency_mismatch",stage="sink"}'] == 1
    assert [k for k in sink if k.startswith("vtp_consumer_lag_messages")], "the sink reports lag"


def test_worker_reports_its_consumer_lag(run):
    lag = {
        k: v
        for k, v in run["metrics"]["worker"].items()
        if k.startswith("vtp_consumer_lag_messages")
    }
    uploads = run["settings"].topics.uploads
    assert any(f'topic="{uploads}"' in k for k in lag), lag


def test_a_pipeline_that_does_not_drain_says_where_it_stands(region_stack):
    settings = region_stack("eu", "undrained", **QUICK)
    producer = Producer({"bootstrap.servers": settings.bootstrap()})
    for i in range(3):
        producer.produce(settings.topics.uploads, key=b"WBA00000000000001", value=b"x%d" % i)
    assert producer.flush(30) == 0
    sink = start_sink(settings)  # no worker: nothing reads the uploads
    try:
        with pytest.raises(NotDrained) as waited:
            wait_drained(settings, [sink], timeout=3)
    finally:
        sink.stop()
    report = str(waited.value)
    assert "not drained after 3 s" in report
    assert f"{settings.topics.worker_app} {settings.topics.uploads}: 0/3" in report
    assert f"--- last lines of {sink.log_path} ---" in report

    refused = start_process(settings, "sink-xx", "sink", "--region", "xx")
    try:
        with pytest.raises(NotDrained) as exited:
            wait_drained(settings, [refused], timeout=60)
    finally:
        refused.stop()
    # the process's own last words come with it
    assert "sink-xx exited with 2:\nvtp: configuration error: region 'xx' is not one of" in str(
        exited.value
    )


def test_topics_in_a_shape_vtp_cannot_use_are_refused_and_a_sink_without_a_registry_says_so(
    base_settings, tmp_path
):
    from confluent_kafka.admin import AdminClient, NewTopic

    from vtp.core.topics import TopicError, create_topics

    settings = base_settings.with_(
        region="cn", data_dir=tmp_path, topic_prefix=f"shape{os.getpid()}"
    )
    sink = start_sink(settings)  # nothing exists yet: no registry to check residency with
    assert sink.popen.wait(60) == 1
    assert "the registry topic shape" in sink.log_tail() and "does not exist" in sink.log_tail()
    admin = AdminClient({"bootstrap.servers": settings.bootstrap()})
    # an uploads topic that keeps the producer's clock would let a gateway decide lateness
    made = admin.create_topics(
        [NewTopic(settings.topics.uploads, num_partitions=4, replication_factor=1)]
    )
    made[settings.topics.uploads].result(30)
    with pytest.raises(
        TopicError, match=r"message\.timestamp\.type=CreateTime, vtp needs LogAppendTime"
    ):
        create_topics(settings)


def test_topics_with_fewer_replicas_or_weaker_writes_than_configured_are_refused(
    base_settings, tmp_path
):
    from vtp.core.topics import TopicError, create_topics

    settings = base_settings.with_(
        region="eu", data_dir=tmp_path, topic_prefix=f"durable{os.getpid()}"
    )
    assert len(create_topics(settings)) == 7  # one broker: 1 replica, min.insync 1
    wanted = settings.with_(topic_replication=2, topic_min_insync=2)
    with pytest.raises(TopicError) as refused:
        create_topics(wanted)
    message = str(refused.value)
    assert f"{settings.topics.uploads} has 1 replicas, VTP_TOPIC_REPLICATION is 2" in message
    assert f"{settings.topics.control} has min.insync.replicas=1, vtp needs 2" in message

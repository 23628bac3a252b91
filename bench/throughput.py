"""`make bench`, throughput: vtp drains a backlog, next to a raw columnar baseline.

For each upload size (about 10 and about 30 samples per upload), on fresh brokers (one per
region, as deployed), the fleet's backlog is produced first, then:

1. the raw columnar baseline, on the same backlog and broker: confluent-kafka reads the
   region's uploads topic, the bodies of each run of one writer schema are concatenated
   into one Avro object-container block (no per-record decode), and ClickHouse parses it
   itself (``INSERT … SELECT … FROM file(…, 'Avro') ARRAY JOIN samples``);
2. vtp: each region's worker (aggregation on) and sink, as processes, timed from start
   until drained; the CPU each process used per sample, and the bytes each internal topic
   holds per byte of input.

And Faust's per-event path alone on the same backlog (``bench.faust_floor``): an agent
taking the raw uploads as the worker does and doing nothing with them.

Then, at about 10 samples per upload, vtp fed at half the rate it drained at: how long an
upload takes from the broker (received_at) to the warehouse (stored_at), p50 and p99.

Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from deploy.broker import fetch_jars, read_state, start_broker, stop_broker
from producers.publish import DEFAULT_START_MS, publish_fleet, publishers_for, register_fleet
from producers.simulator import Vehicle, build_fleet, simulate
from schemas import default_store
from schemas.codec import HEADER_LEN
from schemas.envelope import BATCH_HEADER, container
from vtp.core.regions import REGIONS
from vtp.core.settings import Settings, load_settings
from vtp.core.topics import create_topics
from vtp.core.warehouse import ChdbWarehouse, open_warehouse, rows
from vtp.harness import (
    Process,
    read_outcomes,
    settings_env,
    start_sink,
    start_worker,
    topic_message_count,
    wait_drained,
)

TICKS = os.sysconf("SC_CLK_TCK")
BLOCK_MESSAGES = 10_000  # messages per Avro container block in the baseline


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def topic_bytes(settings: Settings) -> dict[str, int]:
    """Bytes of log segments per topic on the region's local broker."""
    state = read_state(settings)
    assert state is not None, "the bench's broker is not running"
    out: dict[str, int] = defaultdict(int)
    for part in Path(state.data_dir).iterdir():
        if part.is_dir() and "-" in part.name and not part.name.startswith("__"):
            topic = part.name.rsplit("-", 1)[0]
            out[topic] += sum(f.stat().st_size for f in part.glob("*.log"))
    return dict(out)


# -- the raw columnar baseline -------------------------------------------------------


BASELINE_TABLE = """
CREATE TABLE IF NOT EXISTS raw_samples (
    vin String, upload_id String, event_time DateTime64(3, 'UTC'), seq UInt64,
    speed Nullable(Float32), latitude Nullable(Float64), longitude Nullable(Float64),
    heading Nullable(Float32), odometer Nullable(Float64), soc Nullable(Float32),
    is_charging Nullable(Bool), charge_power Nullable(Float32), charge_mode Nullable(String),
    battery_temperature Nullable(Float32), outside_temperature Nullable(Float32),
    gear Nullable(String), dtcs Array(String)
) ENGINE = MergeTree ORDER BY (vin, event_time)
"""

BASELINE_INSERT = """
INSERT INTO raw_samples
SELECT vin, upload_id, fromUnixTimestamp64Milli(s.event_time_ms), s.seq, s.speed,
       s.latitude, s.longitude, s.heading, s.odometer, s.soc, s.is_charging, s.charge_power,
       toString(s.charge_mode), s.battery_temperature, s.outside_temperature,
       toString(s.gear), s.dtcs
FROM file('{path}', 'Avro') ARRAY JOIN samples AS s
"""


def reader(settings: Settings, topic: str) -> Consumer:
    """A consumer of every partition of ``topic`` from its beginning that says when it
    reached each end. Assigned, not subscribed: no group to join, as a raw reader of a
    backlog would do."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap(),
            "group.id": f"bench-reader-{time.time_ns()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "log_level": 3,
        }
    )
    consumer.assign(
        [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.topic_partitions)]
    )
    return consumer


def raw_baseline(settings: Settings, folder: Path) -> tuple[int, float]:
    """(samples stored, seconds) for the region's whole uploads topic."""
    store = default_store()
    warehouse = ChdbWarehouse(folder / f"raw-{settings.region}")
    warehouse.execute(BASELINE_TABLE)
    consumer = reader(settings, settings.topics.uploads)
    partitions = settings.topic_partitions
    ended: set[int] = set()
    by_schema: dict[bytes, list[bytes]] = defaultdict(list)
    started = time.perf_counter()

    def insert(fingerprint: bytes) -> None:
        bodies = by_schema.pop(fingerprint)
        schema = store.by_fingerprint(fingerprint)
        assert schema is not None
        path = folder / f"block-{settings.region}.avro"
        path.write_bytes(container(schema, bodies))
        warehouse.execute(BASELINE_INSERT.format(path=path))

    while len(ended) < partitions:
        for m in consumer.consume(num_messages=BLOCK_MESSAGES, timeout=1.0):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    ended.add(m.partition() or 0)
                continue
            value = m.value() or b""
            fingerprint = value[2:HEADER_LEN]
            by_schema[fingerprint].append(value[HEADER_LEN:])
            if len(by_schema[fingerprint]) >= BLOCK_MESSAGES:
                insert(fingerprint)
    for fingerprint in list(by_schema):
        insert(fingerprint)
    seconds = time.perf_counter() - started
    consumer.close()
    ((stored,),) = rows(warehouse.query("SELECT count() FROM raw_samples"))
    warehouse.close()
    return int(stored), seconds


@dataclass
class FaustFloor:
    events: int
    cpu_s: float  # the whole process, start-up included
    steady_cpu_s: float  # from its first batch to its last


def faust_floor(settings: Settings) -> FaustFloor:
    """Faust's per-event path alone on the region's uploads (``bench.faust_floor``)."""
    expected = topic_message_count(settings, settings.topics.uploads)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "floor.json"
        subprocess.run(
            [sys.executable, "-m", "bench.faust_floor", str(expected), str(out)],
            env=settings_env(settings),
            capture_output=True,
            timeout=600,
            check=True,
        )
        return FaustFloor(**json.loads(out.read_text()))


# -- vtp ------------------------------------------------------------------------------


@dataclass
class Drain:
    samples: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # process kind -> CPU seconds
    topic_ratio: dict[str, float] = field(default_factory=dict)  # topic -> bytes per input byte
    start_up_s: float = 0.0  # until the first worker routed its first batch
    rss_mb: dict[str, list[float]] = field(default_factory=dict)  # process -> once a second


def rss_mb(pid: int) -> float:
    """Resident memory of a process (/proc/<pid>/status), MB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def sample_rss(
    processes: list[Process], into: dict[str, list[float]], stop: threading.Event
) -> None:
    while not stop.wait(1.0):
        for p in processes:
            into.setdefault(p.name, []).append(rss_mb(p.popen.pid))


def drain_with_vtp(stacks: dict[str, Settings], samples: int) -> tuple[Drain, list[Process]]:
    """Start every region's worker and sink on the backlog; return once all drained
    (the processes keep running for the latency run)."""
    before = {r: topic_bytes(s) for r, s in stacks.items()}
    processes: list[Process] = []
    brokers = {r: read_state(s) for r, s in stacks.items()}
    broker_cpu = {r: cpu_seconds(b.pid) for r, b in brokers.items() if b}
    started, started_ms = time.perf_counter(), time.time() * 1000
    for settings in stacks.values():
        processes += [start_worker(settings), start_sink(settings)]
    rss: dict[str, list[float]] = {}
    done = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(processes, rss, done), daemon=True)
    sampler.start()
    try:
        wait_drained(list(stacks.values()), processes, timeout=3600)
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    cpu: dict[str, float] = defaultdict(float)
    for p in processes:
        cpu[p.name.rsplit("-", 1)[0]] += cpu_seconds(p.popen.pid)
    for region, broker in brokers.items():
        if broker:
            cpu["broker"] += cpu_seconds(broker.pid) - broker_cpu[region]
    written: dict[str, int] = defaultdict(int)
    input_bytes = 0
    for region, settings in stacks.items():
        after = topic_bytes(settings)
        input_bytes += after.get(settings.topics.uploads, 0)
        for topic, size in after.items():
            if topic != settings.topics.uploads:
                kind = topic.replace(f".{region}.", ".R.").replace(f"-{region}-", "-R-")
                written[kind] += size - before[region].get(topic, 0)
    ratio = {t: b / max(1, input_bytes) for t, b in sorted(written.items()) if b}
    first_routed = min(first_timestamp_ms(s, s.topics.validated) for s in stacks.values())
    start_up = (first_routed - started_ms) / 1000
    return Drain(samples, seconds, dict(cpu), ratio, start_up, rss), processes


def first_timestamp_ms(settings: Settings, topic: str) -> float:
    """The earliest timestamp of the first messages of ``topic``'s partitions."""
    consumer = reader(settings, topic)
    first: dict[int, float] = {}
    ended: set[int] = set()
    partitions = settings.topic_partitions
    while len(first) + len(ended - set(first)) < partitions:
        for m in consumer.consume(num_messages=partitions, timeout=1.0):
            p = m.partition() or 0
            if m.error() is None:
                first.setdefault(p, m.timestamp()[1])
            elif m.error().code() == KafkaError._PARTITION_EOF:
                ended.add(p)
    consumer.close()
    return min(first.values(), default=float("inf"))


def feed(stacks: dict[str, Settings], fleet: list[Vehicle], rate: float, seconds: float) -> int:
    """Publish fresh uploads at ``rate`` samples/s for ``seconds``; returns uploads sent."""
    publishers = publishers_for(stacks)
    region_of = {v.vin: v.region for v in fleet}
    started, sent_samples, uploads = time.perf_counter(), 0, 0
    # Simulated time runs far ahead of the clock at this rate: it ends now, so no upload
    # is sent from the future (the worker would refuse it as clock skew).
    start_ms = int(time.time() * 1000) - 7_200_000
    for upload in simulate(fleet, seed=12, start_ms=start_ms, duration_s=7200):
        publishers[region_of[upload["vin"]]].publish_upload(upload)
        uploads += 1
        sent_samples += len(upload["samples"])
        ahead = sent_samples / rate - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)
        if time.perf_counter() - started >= seconds:
            break
    for publisher in publishers.values():
        report = publisher.flush(60)
        if not report.ok:
            print(f"  feed: {len(report.failed)} uploads failed, {report.pending} unacknowledged")
    return uploads


def routed_at(settings: Settings, since_ms: int) -> dict[str, int]:
    """raw source -> when the worker sent the upload on (its batch message's timestamp),
    for uploads received since ``since_ms``."""
    consumer = reader(settings, settings.topics.validated)
    partitions = settings.topic_partitions
    found: dict[str, int] = {}
    ended: set[int] = set()
    while len(ended) < partitions:
        for m in consumer.consume(num_messages=1000, timeout=1.0):
            if m.error() is not None:
                if m.error().code() == KafkaError._PARTITION_EOF:
                    ended.add(m.partition() or 0)
                continue
            sidecar = dict(m.headers() or []).get(BATCH_HEADER)
            if not sidecar:
                continue
            side = json.loads(sidecar)
            for offset, received in zip(side["offsets"], side["received_ms"], strict=True):
                if received >= since_ms:
                    found[f"{side['source']}:{offset}"] = m.timestamp()[1]
    consumer.close()
    return found


def stage_latencies_ms(
    stacks: dict[str, Settings], since_ms: int
) -> tuple[list[float], list[float], list[float]]:
    """(received -> stored, received -> routed by the worker, routed -> stored), each
    sorted, for every upload received since ``since_ms`` (read after the sinks stopped:
    they own the embedded engine)."""
    whole: list[float] = []
    worker: list[float] = []
    sink: list[float] = []
    for settings in stacks.values():
        routed = routed_at(settings, since_ms)
        warehouse = open_warehouse(settings)
        try:
            stored = rows(
                warehouse.query(
                    "SELECT raw_source, toUnixTimestamp64Milli(received_at), "
                    "toUnixTimestamp64Milli(stored_at) FROM uploads "
                    "WHERE received_at >= fromUnixTimestamp64Milli({s:Int64})",
                    {"s": since_ms},
                )
            )
        finally:
            warehouse.close()
        for source, received, at in stored:
            whole.append(float(at - received))
            if source in routed:
                worker.append(float(routed[source] - received))
                sink.append(float(at - routed[source]))
    return sorted(whole), sorted(worker), sorted(sink)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run(vehicles: int, minutes: float, per_upload: int, latency_s: float) -> None:
    base = load_settings()
    root = base.data_dir / "bench-throughput"
    shutil.rmtree(root, ignore_errors=True)
    stacks = {r: base.with_(data_dir=root, region=r, kafka_bootstrap="") for r in REGIONS}
    fetch_jars(base)
    processes: list[Process] = []
    try:
        for region, settings in stacks.items():
            state = start_broker(settings)
            stacks[region] = settings.with_(
                kafka_bootstrap=state.bootstrap, kafka_extra={"log_level": 3}
            )
            create_topics(stacks[region])
        fleet = build_fleet(11, owners=vehicles // 2, vehicles=vehicles, regions=tuple(REGIONS))
        for settings in stacks.values():
            register_fleet(settings, fleet)
        published = publish_fleet(
            stacks,
            fleet,
            seed=11,
            duration_s=minutes * 60,
            start_ms=DEFAULT_START_MS,
            upload_interval_s=float(per_upload),
        )
        samples = published.samples
        print(
            f"backlog: {published.uploads:,} uploads, {samples:,} samples "
            f"({samples / published.uploads:.1f} per upload), {vehicles} vehicles, "
            f"{len(stacks)} regions"
        )
        with tempfile.TemporaryDirectory() as folder:
            raw_samples, raw_s = 0, 0.0
            for settings in stacks.values():
                stored, seconds = raw_baseline(settings, Path(folder))
                raw_samples += stored
                raw_s += seconds
        floors = [faust_floor(settings) for settings in stacks.values()]
        drain, processes = drain_with_vtp(stacks, samples)
        vtp_rate, raw_rate = samples / drain.seconds, raw_samples / raw_s
        print(f"  raw columnar baseline  {raw_rate:>10,.0f} samples/s ({raw_samples:,} rows)")
        events = sum(f.events for f in floors)
        steady = sum(f.steady_cpu_s for f in floors) / events * 1e6
        print(
            f"  Faust alone (an agent taking the raw uploads, doing nothing): "
            f"{sum(f.cpu_s for f in floors) / events * 1e6:.1f} µs CPU per upload "
            f"({steady:.1f} after start-up, {steady * events / samples:.1f} per sample): "
            f"at most {samples / events * 1e6 / steady:,.0f} samples/s per core"
        )
        print(
            f"  vtp, aggregation on    {vtp_rate:>10,.0f} samples/s ({drain.seconds:.1f} s), "
            f"{vtp_rate / raw_rate:.3f} of the baseline"
        )
        steady = samples / (drain.seconds - drain.start_up_s)
        print(
            f"    after start-up     {steady:>10,.0f} samples/s (start-up {drain.start_up_s:.1f} s: "
            f"to the first routed batch), {steady / raw_rate:.3f} of the baseline"
        )
        for kind, seconds in sorted(drain.cpu.items()):
            print(f"  CPU {kind:<8} {seconds / samples * 1e6:>8.1f} µs per sample")
        for name, series in sorted(drain.rss_mb.items()):
            marks = [series[min(len(series) - 1, len(series) * q // 4)] for q in (1, 2, 3, 4)]
            print(
                f"  RSS {name:<10} at 1/4, 1/2, 3/4, end of the drain: "
                + " / ".join(f"{mb:,.0f}" for mb in marks)
                + f" MB (peak {max(series):,.0f})"
            )
        for topic, ratio in drain.topic_ratio.items():
            print(f"  bytes written to {topic:<42} {ratio:>6.2f} per input byte")
        if latency_s > 0:
            since_ms = int(time.time() * 1000)
            sent = feed(stacks, fleet, vtp_rate / 2, latency_s)
            if not wait_drained(list(stacks.values()), processes, timeout=600):
                print("  the pipeline did not drain the feed within 600 s")
            for p in processes:
                p.stop()
            found, to_worker, to_sink = stage_latencies_ms(stacks, since_ms)
            for region, settings in stacks.items():
                outcomes = read_outcomes(settings)
                print(
                    f"  {region}: dead-lettered {dict(outcomes.deadlettered)}, quarantined "
                    f"{dict(outcomes.quarantined)}, samples too late {outcomes.too_late}"
                )
            print(
                f"  fed at {vtp_rate / 2:,.0f} samples/s for {latency_s:.0f} s ({sent:,} uploads, "
                f"{len(found):,} stored): upload -> queryable p50 {percentile(found, 0.5):,.0f} ms, "
                f"p99 {percentile(found, 0.99):,.0f} ms"
            )
            for stage, values in (("received -> routed", to_worker), ("routed -> stored", to_sink)):
                print(
                    f"    {stage}: p50 {percentile(values, 0.5):,.0f} ms, "
                    f"p99 {percentile(values, 0.99):,.0f} ms"
                )
    finally:
        for p in processes:
            p.stop()
        for settings in stacks.values():
            stop_broker(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vehicles", type=int, default=240)
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    args = parser.parse_args()
    for per_upload in (10, 30):
        print(f"== about {per_upload} samples per upload")
        run(
            args.vehicles,
            args.minutes,
            per_upload,
            args.latency_seconds if per_upload == 10 else 0.0,
        )


if __name__ == "__main__":
    main()

"""`make bench`, the vehicle edge: uploads/s one gateway core takes over persistent mutual-TLS
WebSockets from many simulated vehicles, and the ack latency at half that rate.

One region, one fresh broker of its own, the region's development PKI and one certificate
per vehicle; realistic uploads from the simulator (the first uploads of each vehicle: most
driving, 10 samples at 1 Hz every 10 s, some parked or charging). `vtp gateway` runs pinned
to one CPU (``taskset -c``); the broker's JVM, the Go load generator (bench/edge_load) and
this driver share the others, so the gateway's core does nothing else. The per-vehicle rate
limit is lifted (the bench measures the gateway, not the limit).

1. Closed loop: every vehicle keeps ``window`` uploads unanswered (tried for each of
   ``--windows``): the most acks/s one gateway core gives when uploads come in batches
   (many frames per read, many ids per ack).
2. Open loop (Poisson arrivals per vehicle, as a fleet sends) at rising rates
   (``--rates``) until the gateway no longer keeps up (acknowledges less than 97 % of
   what is offered, or p99 passes a second): the last rate it kept up with is its
   open-loop maximum, the one a fleet meets. Arrivals one by one cost more CPU per
   upload than batches, so this maximum is lower than the closed loop's.
3. Open loop at half the open-loop maximum: ack latency p50/p99/p999, from the upload's
   scheduled send time to its ack frame.

The gateway's CPU comes from /proc (the same as its process_cpu_seconds_total) over the
measured window; CPU per 1000 uploads is the number that carries over to another machine.
Target (issue 13): at least 5k uploads/s per core, p99 ack at most 50 ms at half load.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.broker import fetch_jars, start_broker, stop_broker
from deploy.gotools import go_environment, go_root
from producers.pki import init_region, issue_vehicle
from producers.publish import DEFAULT_START_MS
from producers.simulator import build_fleet, simulate
from schemas import default_store
from vtp.core.settings import Settings, load_settings
from vtp.core.topics import create_topics
from vtp.harness import settings_env, topic_message_count

REGION = "eu"
LOAD_SOURCE = Path(__file__).resolve().parent / "edge_load"
TICKS = os.sysconf("SC_CLK_TCK")
UPLOADS_PER_VEHICLE = 20  # the generator cycles through them
SAMPLE_EVERY_S = 0.5
TARGET_UPLOADS_PER_S = 5000
TARGET_P99_MS = 50.0
NOISE = 0.1  # of the gateway's CPU used by other processes: the machine is not quiet
OPEN_WINDOW = 32  # uploads in flight per vehicle in the open loop: never what holds it back


# -- inputs: payloads, certificates, the generator ---------------------------------------


@dataclass(frozen=True)
class Payloads:
    folder: Path
    vins: list[str]
    uploads: int
    samples_per_upload: float
    bytes_per_upload: float


def write_payloads(folder: Path, vehicles: int, seed: int = 13) -> Payloads:
    """Each vehicle's first UPLOADS_PER_VEHICLE simulated uploads, encoded as the vehicle
    sends them, in the generator's format: u16 BE id length | id | u32 BE length | upload."""
    store = default_store()
    schema = store.get("VehicleUpload")
    fleet = build_fleet(seed, owners=max(1, vehicles // 2), vehicles=vehicles, regions=(REGION,))
    per_vin: dict[str, list[bytes]] = {v.vin: [] for v in fleet}
    samples = size = full = 0
    for upload in simulate(fleet, seed=seed, start_ms=DEFAULT_START_MS, duration_s=86_400):
        records = per_vin[upload["vin"]]
        if len(records) == UPLOADS_PER_VEHICLE:
            continue
        body = store.encode(upload, schema)
        upload_id = upload["upload_id"].encode()
        records.append(struct.pack(">H", len(upload_id)) + upload_id)
        records.append(struct.pack(">I", len(body)) + body)
        samples += len(upload["samples"])
        size += len(body)
        full += len(records) == UPLOADS_PER_VEHICLE
        if full == len(fleet):
            break
    folder.mkdir(parents=True, exist_ok=True)
    for vin, records in per_vin.items():
        (folder / f"{vin}.bin").write_bytes(b"".join(records))
    uploads = sum(len(r) for r in per_vin.values()) // 2
    return Payloads(folder, sorted(per_vin), uploads, samples / uploads, size / uploads)


def build_generator(settings: Settings) -> Path:
    """bench/edge_load, built into the cache (Go's build cache makes a rebuild instant;
    the first build fetches gorilla/websocket through the Go module proxy)."""
    root = go_root(settings)
    binary = settings.cache_dir / "bench" / "edge_load"
    binary.parent.mkdir(parents=True, exist_ok=True)
    try:
        built = subprocess.run(
            ["go", "build", "-o", str(binary), "."],
            cwd=LOAD_SOURCE,
            env=go_environment(root),
            capture_output=True,
            text=True,
            timeout=600,
        )
    except FileNotFoundError:
        raise SystemExit(
            "go not found: the edge bench's load generator (bench/edge_load) is a Go program; "
            "install Go 1.26 or newer (https://go.dev/dl/) and put it on PATH"
        ) from None
    if built.returncode != 0:
        raise SystemExit(f"building bench/edge_load failed:\n{built.stdout}{built.stderr}")
    return binary


# -- placement and observation ------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    gateway: int  # the one CPU the gateway may use
    others: set[int]  # the broker, the generator, this driver

    @classmethod
    def choose(cls) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit(
                f"the edge bench needs two CPUs (one for the gateway alone); this process may "
                f"use {cpus}"
            )
        return cls(cpus[0], set(cpus[1:]))

    def describe(self) -> str:
        return ",".join(str(c) for c in sorted(self.others))


def threads_on(pid: int) -> tuple[int, set[str]]:
    """How many threads ``pid`` has and the distinct CPU lists they may run on."""
    lists = set()
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    for task in tasks:
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.add(line.split()[1])
    return len(tasks), lists


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cores_busy() -> dict[int, float]:
    """Busy seconds of each CPU since boot (/proc/stat: all but idle and iowait)."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(t) for t in ticks]
            busy[int(name[3:])] = (sum(values[:8]) - values[3] - values[4]) / TICKS
    return busy


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0]) / 1024
    return found.get("VmRSS", 0.0), found.get("VmHWM", 0.0)


def scrape(port: int) -> dict[str, float]:
    """The gateway's metrics, summed over label sets (one region here): name -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name.split("{", 1)[0]] += float(value)
    return dict(out)


@dataclass(frozen=True)
class Sample:
    at: float
    gateway_cpu: float
    accepted: float
    connections: float
    busy: dict[int, float]


class Sampler(threading.Thread):
    """The gateway's CPU, accepted uploads and connections, and every core's busy time,
    twice a second while a load run lasts."""

    def __init__(self, pid: int, metrics_port: int):
        super().__init__(name="edge-bench-sampler", daemon=True)
        self.pid = pid
        self.port = metrics_port
        self.samples: list[Sample] = []
        self.done = threading.Event()

    def take(self) -> Sample:
        metrics = scrape(self.port)
        return Sample(
            time.monotonic(),
            cpu_seconds(self.pid),
            metrics.get("vtp_gateway_uploads_accepted_total", 0.0),
            metrics.get("vtp_gateway_connections", 0.0),
            cores_busy(),
        )

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(self.take())
            self.done.wait(SAMPLE_EVERY_S)

    def window(self, connected: int, warmup: float, duration: float) -> tuple[Sample, Sample]:
        """The samples that bound the generator's measured period: it starts ``warmup``
        after every vehicle is connected."""
        ready = next((s.at for s in self.samples if s.connections >= connected), self.samples[0].at)
        start, stop = ready + warmup, ready + warmup + duration
        inside = [s for s in self.samples if start <= s.at <= stop] or self.samples[-2:]
        return inside[0], inside[-1]


# -- the gateway ---------------------------------------------------------------------------


@dataclass
class Gateway:
    popen: subprocess.Popen[bytes]
    url: str
    metrics_port: int
    log_path: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(settings: Settings, cpu: int, command: list[str] | None = None) -> Gateway:
    """`vtp gateway` pinned to ``cpu`` (as vtp.harness.start_gateway, with taskset):
    ``command`` replaces ``-m vtp.cli gateway`` (a profiling run)."""
    port = free_port()
    where = settings.home / "gateway.json"
    where.unlink(missing_ok=True)
    log_path = settings.home / "logs" / "gateway.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, *(command or ["-m", "vtp.cli", "gateway"])]
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            ["taskset", "-c", str(cpu), *python],  # taskset execs: the pid is the gateway's
            env=settings_env(settings, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    gateway = Gateway(popen, "", port, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"vtp gateway exited ({popen.returncode}):\n{tail(log_path)}")
        try:
            state = json.loads(where.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        if state.get("pid") == popen.pid:
            gateway.url = str(state["url"])
            return gateway
        time.sleep(0.05)
    gateway.stop()
    raise RuntimeError(f"vtp gateway did not listen within 60 s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- load runs -----------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    load: dict[str, Any]  # the generator's JSON
    gateway_cpu_s: float
    gateway_accepted: float
    seconds: float
    core_busy: dict[int, float]  # CPU -> share of the measured window it was busy
    rss_mb: float
    hwm_mb: float
    metrics: dict[str, float] = field(default_factory=dict)  # retried/refused, at the end

    @property
    def cpu_us_per_upload(self) -> float:
        return self.gateway_cpu_s / max(1.0, self.gateway_accepted) * 1e6

    @property
    def gateway_cores(self) -> float:
        return self.gateway_cpu_s / self.seconds


def load_run(
    name: str,
    binary: Path,
    gateway: Gateway,
    inputs: dict[str, Path],
    placement: Placement,
    *,
    rate: float,
    window: int,
    warmup: float,
    duration: float,
) -> Run:
    command = [
        "taskset",
        "-c",
        placement.describe(),
        str(binary),
        f"-url={gateway.url}",
        f"-certs={inputs['certs']}",
        f"-ca={inputs['ca']}",
        f"-payloads={inputs['payloads']}",
        f"-rate={rate:.1f}",
        f"-window={window}",
        f"-warmup={warmup}",
        f"-duration={duration}",
        "-drain=5",
    ]
    sampler = Sampler(gateway.popen.pid, gateway.metrics_port)
    sampler.start()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    finally:
        sampler.done.set()
        sampler.join()
    if done.returncode != 0:
        raise RuntimeError(f"edge_load failed ({done.returncode}):\n{done.stderr[-3000:]}")
    load = json.loads(done.stdout)
    first, last = sampler.window(load["connected"], warmup, duration)
    seconds = last.at - first.at
    busy = {c: (last.busy[c] - first.busy[c]) / seconds for c in sorted(last.busy)}
    rss, hwm = memory_mb(gateway.popen.pid)
    metrics = scrape(gateway.metrics_port)
    kept = {
        k: v
        for k, v in metrics.items()
        if k.startswith(
            ("vtp_gateway_uploads_retried", "vtp_gateway_uploads_refused", "vtp_gateway_oversize")
        )
        and not k.endswith("_created")
        and v
    }
    return Run(
        name,
        load,
        last.gateway_cpu - first.gateway_cpu,
        last.accepted - first.accepted,
        seconds,
        busy,
        rss,
        hwm,
        kept,
    )


def keeps_up(run: Run, rate: float) -> bool:
    """Whether the gateway took what was offered: at least 97 % acknowledged, p99 under 1 s."""
    return float(run.load["acks_per_s"]) >= 0.97 * rate and float(run.load["p99_ms"]) <= 1000


def problems(run: Run) -> str:
    """Retries, refusals, broken connections, unanswered uploads: each one is a finding.
    (An open loop's few uploads due in the run's last instant and not sent are not.)"""
    load = run.load
    found = [f"retried {k} {v}" for k, v in load["retried"].items()]
    found += [f"refused {k} {v}" for k, v in load["refused"].items()]
    found += [f"closed {k} {v}" for k, v in load["disconnected"].items()]
    for key in ("connect_failures", "unanswered", "unexpected_answers"):
        if load.get(key):
            found.append(f"{key} {load[key]}")
    if load["scheduled_not_sent"] > load["sent"] / 1000:
        found.append(f"scheduled_not_sent {load['scheduled_not_sent']} (the load was held back)")
    return ", ".join(found) or "0"


def table(runs: list[Run], payloads: Payloads, placement: Placement) -> str:
    head = (
        "| run | offered uploads/s | acked uploads/s | samples/s | gateway CPU per upload "
        "| gateway core busy | generator CPU | p50 / p99 / p999 ack | gateway RSS "
        "| retries, refusals |"
    )
    lines = [head, "|" + "---|" * 10]
    for run in runs:
        load = run.load
        offered = f"{load['rate_offered']:,.0f}" if load["rate_offered"] else "as acked"
        lines.append(
            f"| {run.name} | {offered} | {load['acks_per_s']:,.0f} | "
            f"{load['acks_per_s'] * payloads.samples_per_upload:,.0f} | "
            f"{run.cpu_us_per_upload:.1f} µs | {run.gateway_cores:.0%} | "
            f"{load['cpu_cores_measured']:.0%} of CPU {placement.describe()} | "
            f"{load['p50_ms']:.1f} / {load['p99_ms']:.1f} / {load['p999_ms']:.1f} ms | "
            f"{run.rss_mb:,.0f} MB | {problems(run)} |"
        )
    return "\n".join(lines)


# -- the bench -----------------------------------------------------------------------------


def run(
    vehicles: int,
    duration: float,
    warmup: float,
    windows: list[int],
    rates: list[float],
    profile: Path | None = None,
) -> None:
    placement = Placement.choose()
    base = load_settings()
    fetch_jars(base)
    binary = build_generator(base)
    root = Path(tempfile.mkdtemp(prefix="vtp-bench-edge-"))
    settings = base.with_(
        data_dir=root,
        region=REGION,
        kafka_bootstrap="",
        kafka_extra={"log_level": 3},
        # no vehicle is ever over its rate here: the bench measures the gateway
        gateway_rate=1e9,
        gateway_burst=1_000_000_000,
    )
    gateway: Gateway | None = None
    broker_started = False
    try:
        started = time.perf_counter()
        payloads = write_payloads(root / "payloads", vehicles)
        pki = init_region(settings.pki_path, REGION)
        for vin in payloads.vins:
            issue_vehicle(settings.pki_path, vin)
        print(
            f"{vehicles} vehicles of {REGION}: {payloads.uploads:,} uploads "
            f"({UPLOADS_PER_VEHICLE} each, cycled), {payloads.samples_per_upload:.2f} samples "
            f"and {payloads.bytes_per_upload:,.0f} bytes per upload; certificates and uploads "
            f"made in {time.perf_counter() - started:.1f} s"
        )
        # Everything started from here inherits the other CPUs; the gateway gets its own.
        os.sched_setaffinity(0, placement.others)
        state = start_broker(settings)
        broker_started = True
        settings = settings.with_(kafka_bootstrap=state.bootstrap)
        create_topics(settings)
        # A profiling run: the gateway's main thread (the event loop) under cProfile,
        # written when it stops; its rates are not the gateway's (cProfile slows it).
        profiled = ["-m", "cProfile", "-o", str(profile), "-m", "vtp.cli", "gateway"]
        gateway = start_gateway(settings, placement.gateway, profiled if profile else None)
        broker_threads, broker_cpus = threads_on(state.pid)
        gateway_threads, gateway_cpus = threads_on(gateway.popen.pid)
        print(
            f"placement: gateway pid {gateway.popen.pid} ({gateway_threads} threads) on CPU "
            f"{'/'.join(sorted(gateway_cpus))}; broker JVM pid {state.pid} ({broker_threads} "
            f"threads) on CPU {'/'.join(sorted(broker_cpus))}; load generator and this driver "
            f"on CPU {placement.describe()}"
        )
        inputs = {
            "certs": settings.pki_path / "vehicles",  # <VIN>.pem / <VIN>.key: the layout it reads
            "ca": pki.edge_ca,
            "payloads": payloads.folder,
        }
        runs: list[Run] = []

        def measure(name: str, rate: float, window: int) -> Run:
            done = load_run(
                name,
                binary,
                gateway,
                inputs,
                placement,
                rate=rate,
                window=window,
                warmup=warmup,
                duration=duration,
            )
            runs.append(done)
            print(
                f"  {name}: {done.load['acks_per_s']:,.0f} acks/s, p99 "
                f"{done.load['p99_ms']:.1f} ms, gateway core {done.gateway_cores:.0%} busy, "
                f"{done.cpu_us_per_upload:.1f} µs gateway CPU per upload"
            )
            return done

        closed = [measure(f"closed loop, window {w}", 0, w) for w in windows]
        best = max(closed, key=lambda r: float(r.load["acks_per_s"]))
        open_max = None
        for rate in rates:
            swept = measure(f"open loop, {rate:,.0f}/s", rate, OPEN_WINDOW)
            if not keeps_up(swept, rate):
                break
            open_max = swept
        if open_max is None:
            print("the gateway kept up with none of the open-loop rates: lower --rates")
            return
        top = float(open_max.load["rate_offered"])
        half = measure("open loop, half the open-loop max", top / 2, OPEN_WINDOW)
        print()
        print(table(runs, payloads, placement))
        print()
        closed_top = best.load["acks_per_s"]
        print(
            f"one gateway core, closed loop (batches): {closed_top:,.0f} uploads/s with its "
            f"core {best.gateway_cores:.0%} busy ({best.load['window']} in flight per vehicle)"
        )
        print(
            f"one gateway core, open loop (arrivals one by one): kept up with {top:,.0f} "
            f"uploads/s ({top * payloads.samples_per_upload:,.0f} samples/s), its core "
            f"{open_max.gateway_cores:.0%} busy at {open_max.cpu_us_per_upload:.1f} µs per "
            f"upload; target {TARGET_UPLOADS_PER_S:,}/s: "
            f"{'met' if top >= TARGET_UPLOADS_PER_S else 'missed'}"
        )
        p99 = half.load["p99_ms"]
        print(
            f"at half that ({top / 2:,.0f}/s): p99 ack {p99:.1f} ms (target "
            f"{TARGET_P99_MS:.0f} ms: {'met' if p99 <= TARGET_P99_MS else 'missed'}), the core "
            f"{half.gateway_cores:.0%} busy at {half.cpu_us_per_upload:.1f} µs per upload"
        )
        # Open-loop arrivals batch less than a closed loop keeping a window full (fewer
        # frames per read and per ack): a core's CPU per upload rises as the rate falls.
        for r in runs:
            busy = ", ".join(f"CPU {c} {b:.0%}" for c, b in r.core_busy.items())
            print(
                f"  {r.name}: the gateway counted {r.gateway_accepted:,.0f} uploads in "
                f"{r.seconds:.1f} s; busy {busy}; gateway RSS {r.rss_mb:,.0f} MB "
                f"(peak {r.hwm_mb:,.0f}); its counters: {r.metrics or 'no retries or refusals'}"
            )
            stolen = r.core_busy.get(placement.gateway, 0.0) - r.gateway_cores
            if stolen > NOISE:
                print(
                    f"    NOT QUIET: other processes took {stolen:.0%} of the gateway's CPU "
                    f"{placement.gateway}; its rates and latencies are not the gateway's alone"
                )
        stored = topic_message_count(settings, settings.topics.uploads)
        acked = sum(r.load["acked"] for r in runs)
        print(
            f"Kafka holds {stored:,} uploads; the vehicles were told of {acked:,} acks"
            + ("" if stored >= acked else " — FEWER STORED THAN ACKNOWLEDGED")
        )
        print()
        print("raw generator output, one object per run in the order above:")
        print(json.dumps([r.load for r in runs], indent=2))
    finally:
        if gateway is not None:
            gateway.stop()
        if broker_started:
            stop_broker(settings)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vehicles", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--windows",
        default="1,8,32",
        help="uploads in flight per vehicle to try in the closed loop (comma-separated)",
    )
    parser.add_argument(
        "--rates",
        default="2500,5000,7500,10000,12500,15000,20000,25000",
        help="open-loop rates, rising, in uploads/s (comma-separated): the sweep stops at "
        "the first the gateway does not keep up with",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the gateway under cProfile and write its stats here (slows it down)",
    )
    args = parser.parse_args()
    run(
        args.vehicles,
        args.duration,
        args.warmup,
        [int(w) for w in args.windows.split(",")],
        [float(r) for r in args.rates.split(",") if r],
        args.profile.resolve() if args.profile else None,
    )


if __name__ == "__main__":
    main()

"""Owner API latency: a one-vehicle 30-day read and full exports of a large owner, and
with --fleet, first pages of random vehicles and small reads from 32 clients at once
(as fast as answered, and at fixed offered rates).

Fills an embedded warehouse with synthetic samples (ClickHouse generates them: one
owner with --vehicles vehicles at one sample per 2 s for 30 days, other owners, and a
fleet of --fleet vehicles sharing --fleet-samples samples), starts `vtp serve --no-sink`
on it, and times the reads over HTTP. Prints the server's peak RSS after each export, to
show that exporting does not hold the owner in memory.

    python -m bench.owner_api [--vehicles 1] [--others 20] [--fleet 40000 --fleet-samples 100000000]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from deploy.broker import fetch_jars, start_broker, stop_broker
from owner_api.tokens import issue, owner_claims
from sinks.migrations import migrate
from vtp.core.keys import load_keyring
from vtp.core.settings import Settings, load_settings
from vtp.core.topics import create_topics
from vtp.core.warehouse import ChdbWarehouse, rows
from vtp.harness import start_process
from vtp.serve import wait_for_service

START_MS = 1_793_491_200_000  # 2026-11-01T00:00Z
DAYS = 30
SAMPLE_EVERY_S = 2

FILL = """
INSERT INTO samples (owner_id, vin, event_time, seq, upload_id, speed, latitude, longitude,
                     heading, odometer, soc, is_charging, battery_temperature,
                     outside_temperature, gear, dtcs, region, schema_version, received_at)
SELECT {owner:String}, {vin:String},
       fromUnixTimestamp64Milli(toInt64({start:Int64} + number * {step_ms:UInt32}), 'UTC'),
       number, concat('u', toString(intDiv(number, 10))),
       toFloat32(abs(sin(number / 500)) * 120), 52 + sin(number / 9000) / 10,
       4.9 + cos(number / 9000) / 10, toFloat32(number % 360), 10000 + number * 0.01,
       toFloat32(20 + 60 * abs(cos(number / 40000))), number % 7 = 0, toFloat32(25),
       toFloat32(10), 'DRIVE', [], 'eu', 1,
       fromUnixTimestamp64Milli(toInt64({start:Int64} + number * {step_ms:UInt32}), 'UTC')
FROM numbers({n:UInt64})
"""
# A fleet of other vehicles in one statement: `vehicles` of them, `per_vehicle` samples
# each, one every `step_ms`, two vehicles per owner.
FILL_FLEET = """
INSERT INTO samples (owner_id, vin, event_time, seq, upload_id, speed, latitude, longitude,
                     heading, odometer, soc, is_charging, battery_temperature,
                     outside_temperature, gear, dtcs, region, schema_version, received_at)
SELECT concat('owner-f', toString(intDiv(v, 2))), concat('WBAFLEET', leftPad(toString(v), 9, '0')),
       fromUnixTimestamp64Milli(toInt64({start:Int64} + k * {step_ms:UInt32}), 'UTC'),
       k, concat('u', toString(intDiv(k, 10))),
       toFloat32(abs(sin(k / 50)) * 120), 48 + v / 10000, 2 + v / 10000, toFloat32(k % 360),
       10000 + k * 0.1, toFloat32(20 + 60 * abs(cos(k / 4000))), k % 7 = 0, toFloat32(25),
       toFloat32(10), 'DRIVE', [], 'eu', 1,
       fromUnixTimestamp64Milli(toInt64({start:Int64} + k * {step_ms:UInt32}), 'UTC')
FROM (SELECT number % {vehicles:UInt64} AS v, intDiv(number, {vehicles:UInt64}) AS k
      FROM numbers({n:UInt64}))
"""

# One upload row per fleet vehicle: what the API knows an owner's vehicles by.
FLEET_UPLOADS = """
INSERT INTO uploads (owner_id, vin, upload_id, sent_at, received_at, first_event_time,
                     last_event_time, sample_count, gateway_firmware, schema_version, region,
                     raw_source, topic, partition, offset)
SELECT owner_id, vin, 'fleet', max(event_time), max(event_time), min(event_time),
       max(event_time), count(), '3.2.1', 1, 'eu', '', 'bench', 0, 0
FROM samples WHERE startsWith(vin, 'WBAFLEET') GROUP BY owner_id, vin
"""

UPLOADS = """
INSERT INTO uploads (owner_id, vin, upload_id, sent_at, received_at, first_event_time,
                     last_event_time, sample_count, gateway_firmware, schema_version, region,
                     raw_source, topic, partition, offset)
SELECT owner_id, vin, upload_id, max(event_time), max(event_time), min(event_time),
       max(event_time), count(), '3.2.1', 1, 'eu', '', 'bench', 0, 0
FROM samples WHERE owner_id = {owner:String} GROUP BY owner_id, vin, upload_id
"""


def fill(
    path: Path, vehicles: int, others: int, fleet: int = 0, fleet_samples: int = 0
) -> tuple[str, list[str], int]:
    wh = ChdbWarehouse(path)
    migrate(wh)
    per_vehicle = DAYS * 86400 // SAMPLE_EVERY_S
    owner, vins = "owner-big", [f"WBABENCH{i:09d}" for i in range(vehicles)]
    started = time.perf_counter()
    for vin in vins:
        wh.execute(
            FILL,
            {
                "owner": owner,
                "vin": vin,
                "start": START_MS,
                "step_ms": SAMPLE_EVERY_S * 1000,
                "n": per_vehicle,
            },
        )
    for i in range(others):
        wh.execute(
            FILL,
            {
                "owner": f"owner-{i:04d}",
                "vin": f"WBAOTHER{i:09d}",
                "start": START_MS,
                "step_ms": 60_000,
                "n": DAYS * 1440,
            },
        )
    if fleet:
        per = fleet_samples // fleet
        wh.execute(
            FILL_FLEET,
            {
                "start": START_MS,
                "step_ms": DAYS * 86_400_000 // per,
                "vehicles": fleet,
                "n": per * fleet,
            },
        )
        wh.execute(FLEET_UPLOADS)
    wh.execute(UPLOADS, {"owner": owner})
    total = rows(wh.query("SELECT count() FROM samples"))[0][0]
    print(
        f"filled {total:,} samples in {time.perf_counter() - started:.1f} s "
        f"({per_vehicle * vehicles:,} of them owner-big's)"
    )
    settle_merges(wh)
    wh.close()
    return owner, vins, per_vehicle * vehicles


def settle_merges(wh: ChdbWarehouse, most_s: float = 300.0) -> None:
    """Wait for the merges the fill set off: timed alongside them, the reads and exports
    measured the engine's background work as much as the API (Parquet export 3.9 s
    instead of 2.0)."""
    started = time.perf_counter()
    quiet = 0
    while quiet < 3 and time.perf_counter() - started < most_s:
        running = rows(wh.query("SELECT count() FROM system.merges"))[0][0]
        quiet = quiet + 1 if running == 0 else 0
        time.sleep(1.0)
    parts = rows(wh.query("SELECT count() FROM system.parts WHERE active AND table = 'samples'"))
    print(
        f"merges settled after {time.perf_counter() - started:.0f} s "
        f"({parts[0][0]} active parts of samples)"
    )


def percentiles(ms: list[float]) -> str:
    ms = sorted(ms)
    return (
        f"p50 {ms[len(ms) // 2]:6.1f} ms, p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:6.1f} ms"
    )


def fleet_reads(settings: Settings, url: str, fleet: int, window: dict[str, str]) -> None:
    """First pages of random fleet vehicles, one at a time; then small reads from 32
    clients for 10 s as fast as they are answered (the region's ceiling), and at 100 and
    300 reads/s offered (what an owner app's requests meet below it)."""
    keyring = load_keyring(settings)
    rng = random.Random(5)

    def client(v: int) -> tuple[httpx.Client, str]:
        token = issue(keyring, owner_claims(f"owner-f{v // 2}", "eu", 3600))
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=url, headers=headers, timeout=60), f"WBAFLEET{v:09d}"

    took = []
    for v in rng.sample(range(fleet), 200):
        api, vin = client(v)
        t = time.perf_counter()
        api.get(f"/v1/vehicles/{vin}/samples", params={**window, "limit": 1000}).raise_for_status()
        took.append((time.perf_counter() - t) * 1000)
        api.close()
    print(f"first page of 1000, 200 random vehicles of {fleet:,}: {percentiles(took)}")

    def page_of_100(api: httpx.Client, vin: str) -> None:
        params = {**window, "limit": 100, "signals": "speed,soc"}
        api.get(f"/v1/vehicles/{vin}/samples", params=params).raise_for_status()

    done: list[float] = []
    stop_at = time.monotonic() + 10

    def reader(seed: int) -> None:
        local = random.Random(seed)
        api, vin = client(local.randrange(fleet))
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            page_of_100(api, vin)
            done.append((time.perf_counter() - t) * 1000)
        api.close()

    run_threads(reader, 32)
    print(
        f"32 clients, as fast as answered, a page of 100 samples: "
        f"{len(done) / 10:,.0f} reads/s, {percentiles(done)}"
    )
    for rate in (100, 300):
        offered(client, page_of_100, fleet, rate)


def offered(
    client: Callable[[int], tuple[httpx.Client, str]],
    read: Callable[[httpx.Client, str], None],
    fleet: int,
    rate: int,
) -> None:
    """Reads sent at a fixed rate for 10 s from 32 clients, each timed from when it was
    due (a read that waits for a free client counts its wait: no coordinated omission)."""
    due_at = time.perf_counter() + 0.5
    total = rate * 10
    next_read = iter(range(total))
    lock = threading.Lock()
    took: list[float] = []

    def sender(seed: int) -> None:
        api, vin = client(random.Random(seed).randrange(fleet))
        while True:
            with lock:
                i = next(next_read, None)
            if i is None:
                break
            due = due_at + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            try:
                read(api, vin)
            except httpx.HTTPError:
                failed.append(i)
                continue
            took.append((time.perf_counter() - due) * 1000)
        api.close()

    failed: list[int] = []
    started = time.perf_counter()
    run_threads(sender, 32)
    answered = len(took) / (time.perf_counter() - started - 0.5)
    print(
        f"{rate} reads/s offered by 32 clients: {answered:,.0f} answered/s, {percentiles(took)}"
        + (f", {len(failed)} failed" if failed else "")
    )


def run_threads(target: Callable[[int], None], count: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vehicles", type=int, default=1)
    parser.add_argument("--others", type=int, default=20)
    parser.add_argument("--fleet", type=int, default=0, help="other vehicles in one statement")
    parser.add_argument("--fleet-samples", type=int, default=0, help="their samples in all")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="vtp-bench-api-"))
    settings = load_settings().with_(data_dir=data_dir, region="eu")
    owner, vins, expected = fill(
        settings.warehouse_path, args.vehicles, args.others, args.fleet, args.fleet_samples
    )
    fetch_jars(settings)
    # A broker of its own: an erasure completes once the worker has been told (no worker
    # runs here; the notice only has to be taken by Kafka).
    settings = settings.with_(kafka_bootstrap=start_broker(settings).bootstrap)
    create_topics(settings)
    serve = start_process(settings, "serve-eu", "serve", "--no-sink")
    server = serve.popen
    try:
        url = wait_for_service(settings, serve)
        token = issue(load_keyring(settings), owner_claims(owner, "eu", 3600))
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600)
        window = {"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"}
        print(f"rss after start {peak_rss_mib(server.pid):,.0f} MiB")

        t = time.perf_counter()
        first = api.get(f"/v1/vehicles/{vins[0]}/samples", params={**window, "limit": 1000})
        first.raise_for_status()
        print(f"one vehicle, 30 days, first page of 1000:      {time.perf_counter() - t:6.3f} s")
        t, n, cursor = time.perf_counter(), 0, None
        while True:
            params = {**window, "limit": 10_000, "signals": "speed,soc,latitude,longitude"}
            if cursor:
                params["cursor"] = cursor
            body = api.get(f"/v1/vehicles/{vins[0]}/samples", params=params).json()
            n += len(body["samples"])
            cursor = body["next"]
            if not cursor:
                break
        took = time.perf_counter() - t
        print(
            f"one vehicle, 30 days, all {n:,} samples in pages of 10k: {took:6.1f} s "
            f"({n / took:,.0f} samples/s)"
        )
        for fmt in ("parquet", "jsonl", "csv"):
            t, size = time.perf_counter(), 0
            with api.stream("GET", "/v1/export", params={"format": fmt}) as r:
                r.raise_for_status()
                for chunk in r.iter_bytes():
                    size += len(chunk)
            took = time.perf_counter() - t
            print(
                f"export {fmt:8} {expected:,} samples: {took:6.1f} s, {size / 2**20:7.1f} MiB, "
                f"server peak RSS {peak_rss_mib(server.pid):,.0f} MiB"
            )
        if args.fleet:
            fleet_reads(settings, url, args.fleet, window)
        t = time.perf_counter()
        erasure = api.post("/v1/erasure").json()["erasure"]
        while erasure["status"] != "completed":
            time.sleep(0.2)
            erasure = api.get(f"/v1/erasures/{erasure['erasure_id']}").json()["erasure"]
        deleted = sum(erasure["rows_deleted"].values())
        print(
            f"erasure of the owner, {deleted:,} rows: {time.perf_counter() - t:6.1f} s "
            "from request to completed"
        )
    finally:
        serve.stop()
        stop_broker(settings)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

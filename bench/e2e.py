"""`make bench`: end-to-end and per-stage throughput on this machine.

End to end: one region's stack as deployed (a fresh broker of its own, the worker and
the sink as processes), the simulator publishing that region's fleet as fast as it can;
samples/s = samples / (first publish .. pipeline drained). Stages: the pure
validate/route function, the sink's warehouse side (facts read by ClickHouse's Avro
parser, samples and uploads inserts), the pure aggregation.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Message

from deploy.broker import fetch_jars, start_broker, stop_broker
from producers.publish import DEFAULT_START_MS, publish_fleet, register_fleet
from producers.simulator import build_fleet, simulate
from schemas import default_store
from schemas.codec import HEADER_LEN
from sinks.columnar import NEWEST, Provenance, SampleRows, facts_container, plain_uploads_table
from sinks.store import WarehouseSinkStore
from stream_jobs.sessions import SessionConfig, advance, ingest, new_state
from stream_jobs.validate import Limits, RawUpload, SeenUploads, route_batch
from vtp.core.settings import load_settings
from vtp.core.topics import create_topics
from vtp.core.warehouse import ChdbWarehouse, open_warehouse
from vtp.harness import start_sink, start_worker, wait_drained
from vtp.oracle import compare


def uploads_for(vehicles: int, minutes: float, seed: int = 3):
    fleet = build_fleet(seed, owners=max(1, vehicles // 2), vehicles=vehicles, regions=("eu",))
    return fleet, list(
        simulate(fleet, seed=seed, start_ms=DEFAULT_START_MS, duration_s=minutes * 60)
    )


def sink_stage(folder: Path, uploads: list[dict[str, Any]]) -> float:
    """Seconds the sink's warehouse side takes for ``uploads`` (newest schema, every one
    plain), in batches of 2000: the facts read, the samples and uploads inserts."""
    store = default_store()
    messages = [
        Message(
            topic="v", partition=0, offset=i, key=u["vin"].encode(), value=store.encode(u, NEWEST)
        )
        for i, u in enumerate(uploads)
    ]
    warehouse = ChdbWarehouse(folder)
    sink = WarehouseSinkStore(warehouse, b"k" * 32, owns=True)
    sink.prepare()
    started = time.perf_counter()
    for i in range(0, len(messages), 2000):
        chunk = messages[i : i + 2000]
        token = f"b-0-{i}-{i + len(chunk) - 1}"
        facts = sink.upload_facts(facts_container(chunk))
        rows = SampleRows()
        for m, n in zip(chunk, facts.column("sample_count").to_pylist(), strict=True):
            rows.add((m.value() or b"")[HEADER_LEN:], "owner", 0, NEWEST.version, n)
        sink.insert_samples(rows, "eu", token)
        where = [Provenance(0, f"raw:0:{m.offset()}", m.offset() or 0) for m in chunk]
        uploads_rows = plain_uploads_table(
            facts, list(range(len(chunk))), ["owner"] * len(chunk), where, "eu", "v", 0
        )
        sink.insert("uploads", uploads_rows, token)
    elapsed = time.perf_counter() - started
    sink.close()
    return elapsed


def bench_stages(vehicles: int, minutes: float) -> None:
    fleet, uploads = uploads_for(vehicles, minutes)
    samples = sum(len(u["samples"]) for u in uploads)
    store = default_store()
    v1 = store.get("VehicleUpload", 1)
    t = time.perf_counter()
    encoded = [store.encode(u, v1) for u in uploads]
    enc_s = time.perf_counter() - t
    raws = [
        RawUpload(e, u["vin"].encode(), 0, i, u["sent_at_ms"])
        for i, (e, u) in enumerate(zip(encoded, uploads, strict=True))
    ]
    registry = {v.vin: v.registration_in("eu") for v in fleet}
    limits = Limits(300_000, 7 * 86_400_000, "eu")
    t = time.perf_counter()
    route_batch(raws, store, registry, SeenUploads(), limits)
    route_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        sink_s = sink_stage(Path(tmp) / "wh", uploads)
    states = {v.vin: new_state(v.vin, "eu", v.time_zone, v.battery_capacity_kwh) for v in fleet}
    config = SessionConfig()
    t = time.perf_counter()
    for i in range(
        0, len(uploads), 1000
    ):  # one worker batch: ingest all, advance each vehicle once
        touched = set()
        for u in uploads[i : i + 1000]:
            ingest(states[u["vin"]], u, config, registry[u["vin"]])
            touched.add(u["vin"])
        for vin in touched:
            advance(states[vin], config, registry[vin])
    aggregate_s = time.perf_counter() - t
    print(
        f"stage input: {len(uploads)} uploads, {samples} samples ({samples / len(uploads):.1f} per upload)"
    )
    print(f"  encode (SDK side)        {samples / enc_s:>12,.0f} samples/s")
    print(f"  validate + route (pure)  {samples / route_s:>12,.0f} samples/s")
    print(f"  sink: facts + inserts    {samples / sink_s:>12,.0f} samples/s")
    print(f"  aggregate (pure)         {samples / aggregate_s:>12,.0f} samples/s")


def bench_end_to_end(vehicles: int, minutes: float) -> None:
    base = load_settings()
    settings = base.with_(data_dir=base.data_dir / "bench", kafka_bootstrap="", region="eu")
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    fetch_jars(settings)
    state = start_broker(settings)
    settings = settings.with_(kafka_bootstrap=state.bootstrap)
    try:
        create_topics(settings)
        fleet = build_fleet(3, owners=max(1, vehicles // 2), vehicles=vehicles, regions=("eu",))
        register_fleet(settings, fleet)
        processes = [start_worker(settings), start_sink(settings)]
        try:
            time.sleep(8)  # let the worker join its group before the clock starts
            started = time.perf_counter()
            published = publish_fleet(settings, fleet, seed=3, duration_s=minutes * 60)
            publish_s = time.perf_counter() - started
            wait_drained(settings, processes, timeout=1800)
            total_s = time.perf_counter() - started
        finally:
            for p in processes:
                p.stop()  # the sinks own the chdb folders the comparison reads
        print(
            f"end to end: {published.uploads} uploads, {published.samples} samples, {vehicles} vehicles"
        )
        print(
            f"  simulator+SDK publish    {published.samples / publish_s:>12,.0f} samples/s ({publish_s:.1f} s)"
        )
        print(
            f"  produced -> stored       {published.samples / total_s:>12,.0f} samples/s ({total_s:.1f} s)"
        )
        print("aggregates against the simulator's ground truth:")
        wh = open_warehouse(settings)
        try:
            print(compare(wh, published.truth, [v.vin for v in fleet]).table())
        finally:
            wh.close()
    finally:
        stop_broker(settings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vehicles", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--stages-only", action="store_true")
    args = parser.parse_args()
    bench_stages(args.vehicles, min(args.minutes, 30.0))
    print(
        f"  peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:>8,.0f} MiB"
    )
    if not args.stages_only:
        bench_end_to_end(args.vehicles, args.minutes)


if __name__ == "__main__":
    main()

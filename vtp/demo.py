"""`vtp demo` / `make demo`: a fresh local stack, a simulated fleet in two regions,
the real worker and sinks as processes, and what owners would see."""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile

import httpx

from deploy.broker import fetch_jars, start_broker, stop_broker
from owner_api.report import (
    format_activity,
    format_report,
    last_days,
    owner_report,
    recent_charges,
    recent_trips,
)
from owner_api.serve import wait_for_service
from owner_api.tokens import issue, owner_claims, signing_key
from producers.faults import fault_messages
from producers.publish import DEFAULT_START_MS, publish_fleet, register_fleet
from producers.sdk import TelemetryPublisher
from producers.simulator import build_fleet
from sinks.warehouse import open_warehouse, rows
from vtp.pipeline import NotDrained, read_outcomes, start_serve, start_worker, wait_drained
from vtp.settings import Settings
from vtp.topics import create_topics


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(base: Settings, seed: int = 7, minutes: float = 60.0) -> int:
    settings = base.with_(data_dir=base.data_dir / "demo", kafka_bootstrap="")
    shutil.rmtree(settings.data_dir, ignore_errors=True)  # every run starts fresh
    say(f"== vtp demo: data in {settings.data_dir}")
    fetch_jars(settings)
    state = start_broker(settings)
    try:
        return _run_on_broker(settings, state, seed, minutes)
    finally:
        stop_broker(settings)  # whatever happened above, by the pid in the state file
        say("stopped: worker, owner services (with their sinks), broker")


def _run_on_broker(settings: Settings, state, seed: int, minutes: float) -> int:
    # librdkafka's start-up notices (e.g. an idempotent producer waiting for a fresh
    # broker's coordinator) would drown the demo's output; errors still print.
    settings = settings.with_(kafka_bootstrap=state.bootstrap, kafka_extra={"log_level": 3})
    say(
        f"broker: Apache Kafka {settings.kafka_version} (KRaft) pid {state.pid} at {state.bootstrap}"
    )
    processes = []
    try:
        create_topics(settings)
        fleet = build_fleet(seed, owners=30, vehicles=52, regions=settings.regions)
        registered, unregistered = fleet[:-2], fleet[-2:]  # two gateways nobody registered
        register_fleet(settings, registered)
        say(f"fleet: {len({v.owner_id for v in fleet})} owners, {len(fleet)} vehicles "
            f"({', '.join(f'{r}: {sum(v.region == r for v in fleet)}' for r in settings.regions)}), "
            f"{len(unregistered)} of them not in the registry")  # fmt: skip
        processes.append(start_worker(settings))
        serves = {r: start_serve(settings, r) for r in settings.regions}
        processes += serves.values()
        urls = {r: wait_for_service(settings, r, p) for r, p in serves.items()}
        say("started: vtp worker, " + ", ".join(
            f"vtp serve --region {r} (sink + owner API at {urls[r]})" for r in settings.regions
        ))  # fmt: skip

        publisher = TelemetryPublisher(
            settings.bootstrap(), settings.topics.uploads, kafka_extra=settings.kafka_extra
        )
        published = publish_fleet(
            settings, fleet, seed=seed, duration_s=minutes * 60, publisher=publisher
        )
        faults = fault_messages(
            registered[0].vin,
            unregistered[0].vin,
            published.first_uploads[registered[0].vin],
            DEFAULT_START_MS,
        )
        for fault in faults:
            publisher.publish_raw(fault.key, fault.value, f"fault:{fault.reason}")
        report = publisher.flush(60)
        produced = report.delivered
        say(f"produced: {published.uploads} uploads with {published.samples} samples "
            f"({minutes:g} simulated minutes) + {len(faults)} bad messages = {produced} messages "
            f"delivered, {len(report.failed)} failed")  # fmt: skip

        started = time.monotonic()
        try:
            wait_drained(settings, processes, timeout=240)
        except NotDrained as exc:
            say(str(exc))
            return 1
        say(f"drained {time.monotonic() - started:.1f} s after the last upload was acknowledged")
        for region in settings.regions:
            owner = _most_active_owner(published.truth, registered, region)
            _show_owner_api(settings, region, urls[region], owner)
    finally:
        for p in processes:
            p.stop()

    outcomes = read_outcomes(settings)
    stored_uploads, stored_samples = 0, 0
    for region in settings.regions:
        wh = open_warehouse(settings, region)
        try:
            (ups, samples, foreign), = rows(wh.query(
                "SELECT (SELECT count() FROM uploads), count(), countIf(region != {r:String}) "
                "FROM samples", {"r": region}))  # fmt: skip
        finally:
            wh.close()
        say(
            f"warehouse {region}: {ups} uploads, {samples} samples, {foreign} rows of another region"
        )
        stored_uploads += ups
        stored_samples += samples
    say(f"dead-lettered: {outcomes.deadlettered_total} {dict(outcomes.deadlettered)}")
    say(f"quarantined:   {outcomes.quarantined_total} {dict(outcomes.quarantined)}")
    accounted = stored_uploads + outcomes.deadlettered_total + outcomes.quarantined_total
    balanced = accounted == produced
    say(f"reconciliation: produced {produced} = stored {stored_uploads} + dead-lettered "
        f"{outcomes.deadlettered_total} + quarantined {outcomes.quarantined_total} "
        f"-> {'OK' if balanced else f'MISMATCH ({accounted})'}")  # fmt: skip
    expected_samples = sum(
        t.samples
        for vin, t in published.truth.vehicles.items()
        if vin not in {v.vin for v in unregistered}
    )
    say(
        f"samples stored {stored_samples}, simulator generated {expected_samples} for registered vehicles"
    )

    for region in settings.regions:
        owner = _most_active_owner(published.truth, registered, region)
        wh = open_warehouse(settings, region)
        try:
            say("")
            say(format_report(owner, region, owner_report(wh, owner)))
            say(
                format_activity(
                    recent_trips(wh, owner), recent_charges(wh, owner), last_days(wh, owner)
                )
            )
        finally:
            wh.close()
        for truth in published.truth.by_owner(owner):
            say(f"    simulator truth {truth.vin}: {truth.samples} samples, "
                f"driven {truth.distance_km:.3f} km, last SoC {truth.last_soc}")  # fmt: skip
    return 0 if balanced and stored_samples == expected_samples else 1


def _show_owner_api(settings: Settings, region: str, url: str, owner: str) -> None:
    """What an owner's app does: list vehicles, export everything, share a little."""
    key = signing_key(settings)
    token = issue(key, owner_claims(owner, region, 600))
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as api:
        vehicles = api.get("/v1/vehicles").json()["vehicles"]
        started = time.monotonic()
        export = api.get("/v1/export", params={"format": "parquet"})
        took = time.monotonic() - started
        manifest = json.loads(zipfile.ZipFile(io.BytesIO(export.content)).read("manifest.json"))
        grant = api.post("/v1/grants", json={"party": "Insurer", "scopes": ["driving"],
                                             "expires_in_s": 3600}).json()  # fmt: skip
    say(f"\nowner API {region}, {owner}: GET /v1/vehicles -> {len(vehicles)} vehicles; "
        f"GET /v1/export?format=parquet -> {len(export.content) / 1024:.0f} KiB in {took:.2f} s, "
        f"manifest {manifest['row_counts']}")  # fmt: skip
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {grant['token']}"}) as party:
        vin = vehicles[0]["vin"]
        speed = party.get(f"/v1/vehicles/{vin}/samples", params={"signals": "speed", "limit": 5})
        where = party.get(f"/v1/vehicles/{vin}/samples", params={"signals": "latitude"})
    say(f"  grant to 'Insurer' (scope driving): speed -> {speed.status_code} "
        f"({len(speed.json()['samples'])} samples), latitude -> {where.status_code} "
        f"{where.json()['error']}")  # fmt: skip
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
        log = api.get("/v1/audit").json()["entries"]
    say(f"  access log: {len(log)} entries, e.g. " + "; ".join(
        f"{e['actor']} {e['action']} {e['resource']} ({e['rows']} rows, {e['status']})" for e in log[:3]
    ))  # fmt: skip


def _most_active_owner(truth, registered, region: str) -> str:
    """The owner with the most vehicles, then the most distance: the richest report."""
    owners = {v.owner_id for v in registered if v.region == region}
    return max(
        sorted(owners),
        key=lambda o: (len(truth.by_owner(o)), sum(t.distance_km for t in truth.by_owner(o))),
    )

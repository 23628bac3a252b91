"""`vtp demo` / `make demo`: two region stacks, each on its own local Kafka broker, a
simulated fleet whose vehicles publish to their own region, the real workers, sinks and
owner APIs as processes, counts that add up per region, a scan that finds nothing of
one region in the other, and what owners see."""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from dataclasses import replace

import httpx

from deploy.broker import fetch_jars, start_broker, stop_broker
from owner_api.tokens import issue, owner_claims
from producers.faults import fault_messages
from producers.publish import (
    ending_now,
    flush_all,
    publish_fleet,
    publishers_for,
    register_fleet,
)
from producers.simulator import GroundTruth, Vehicle, build_fleet
from schemas.registry import Period
from vtp.core.keys import load_keyring
from vtp.core.regions import REGIONS
from vtp.core.settings import Settings
from vtp.core.warehouse import open_warehouse, rows
from vtp.harness import (
    NotDrained,
    read_outcomes,
    start_region,
    topic_message_count,
    wait_drained,
)
from vtp.report import (
    format_activity,
    format_report,
    last_days,
    owner_report,
    recent_charges,
    recent_trips,
)
from vtp.scan import foreign_to, scan_region


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(base: Settings, seed: int = 7, minutes: float = 60.0) -> int:
    root = base.data_dir / "demo"
    shutil.rmtree(root, ignore_errors=True)  # every run starts fresh
    stacks = {r: base.with_(data_dir=root, region=r, kafka_bootstrap="") for r in REGIONS}
    say(f"== vtp demo: one stack per region, each on its own broker; data in {root}/<region>")
    fetch_jars(base)
    try:
        for region, settings in stacks.items():
            state = start_broker(settings)
            # librdkafka's start-up notices would drown the demo's output; errors print.
            stacks[region] = settings.with_(
                kafka_bootstrap=state.bootstrap, kafka_extra={"log_level": 3}
            )
            say(
                f"{region}: Apache Kafka {settings.kafka_version} (KRaft) pid {state.pid} at {state.bootstrap}"
            )
        return _run_on_brokers(stacks, seed, minutes)
    finally:
        for settings in stacks.values():
            stop_broker(settings)  # whatever happened above, by the pid in its state file
        say("stopped: workers, owner services (with their sinks), brokers")


def fleet_with_changes(
    seed: int, start_ms: int, minutes: float
) -> tuple[list[Vehicle], dict[str, Vehicle]]:
    """The demo fleet; halfway through, one EU car is sold and one CN car moves to the EU."""
    fleet = build_fleet(seed, owners=30, vehicles=52, regions=tuple(REGIONS))
    halfway = start_ms + int(minutes * 30_000)
    sold = next(v for v in fleet if v.region == "eu")
    moved = next(v for v in fleet if v.region == "cn")
    changed = {
        "sold": replace(
            sold, history=(Period(0, sold.owner_id, "eu"), Period(halfway, "owner-9001", "eu"))
        ),
        "moved": replace(
            moved, history=(Period(0, moved.owner_id, "cn"), Period(halfway, moved.owner_id, "eu"))
        ),
    }
    by_vin = {v.vin: v for v in changed.values()}
    return [by_vin.get(v.vin, v) for v in fleet], changed


def _run_on_brokers(stacks: dict[str, Settings], seed: int, minutes: float) -> int:
    processes = []
    start_ms = ending_now(minutes * 60)  # the last hour: in the owner API's default window
    fleet, changed = fleet_with_changes(seed, start_ms, minutes)
    registered, unregistered = fleet[:-2], fleet[-2:]  # two gateways nobody registered
    try:
        urls = {}
        for region, settings in stacks.items():
            started, urls[region] = start_region(settings)
            processes += started
            register_fleet(settings, registered)
            say(
                f"{region}: vtp worker, vtp serve (sink + owner API at {urls[region]}), "
                f"{sum(region in v.regions for v in registered)} vehicles in its registry"
            )
        sold, moved = changed["sold"], changed["moved"]
        say(
            f"fleet: {len({v.owner_id for v in fleet})} owners, {len(fleet)} vehicles, each publishing "
            f"to its own region's broker; {len(unregistered)} not in any registry; halfway "
            f"{sold.vin} is sold (eu) and {moved.vin} moves from cn to eu"
        )

        publishers = publishers_for(stacks)
        published = publish_fleet(
            stacks,
            fleet,
            seed=seed,
            duration_s=minutes * 60,
            start_ms=start_ms,
            publishers=publishers,
            collect_positions=True,
        )
        eu_vehicle = next(v for v in registered if v.region == "eu" and not v.history)
        stranger = next(v for v in unregistered if v.region == "eu")
        faults = fault_messages(
            eu_vehicle.vin, stranger.vin, published.first_uploads[eu_vehicle.vin], start_ms
        )
        for fault in faults:
            publishers["eu"].publish_raw(
                fault.key, fault.value, f"fault:{fault.reason}", fault.created_ms
            )
        report = flush_all(publishers)
        produced = dict(published.uploads_by_region)
        produced["eu"] += len(faults)
        say(
            f"produced: {published.uploads} uploads with {published.samples} samples "
            f"({minutes:g} simulated minutes) + {len(faults)} bad messages (eu): "
            + ", ".join(f"{r} {n} messages" for r, n in sorted(produced.items()))
            + f"; {report.delivered} delivered, {len(report.failed)} failed"
        )

        since = time.monotonic()
        try:
            wait_drained(list(stacks.values()), processes, timeout=240)
        except NotDrained as exc:
            say(str(exc))
            return 1
        say(f"drained {time.monotonic() - since:.1f} s after the last upload was acknowledged")
        owners = {r: _most_active_owner(published.truth, registered, r) for r in stacks}
        for region, settings in stacks.items():
            _show_owner_api(settings, urls[region], owners[region])
        _show_sale(stacks["eu"], urls["eu"], sold)
    finally:
        for p in processes:
            p.stop()

    balanced = all(_reconcile(settings) for settings in stacks.values())
    clean = all(_scan(stacks, r, fleet, published.positions) for r in stacks)
    for region, settings in stacks.items():
        owner = owners[region]
        wh = open_warehouse(settings)
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
    return 0 if balanced and clean else 1


def _reconcile(settings: Settings) -> bool:
    """Every message the region's broker accepted: stored, dead-lettered or quarantined."""
    region = settings.region
    produced = topic_message_count(settings, settings.topics.uploads)
    outcomes = read_outcomes(settings)
    wh = open_warehouse(settings)
    stored: int
    samples: int
    try:
        ((stored, samples),) = rows(
            wh.query("SELECT uniqExact(upload_id), (SELECT count() FROM samples) FROM uploads")
        )
    finally:
        wh.close()
    accounted = stored + outcomes.deadlettered_total + outcomes.quarantined_total
    say(
        f"{region}: stored {stored} uploads ({samples} samples); dead-lettered "
        f"{outcomes.deadlettered_total} {dict(outcomes.deadlettered)}; quarantined "
        f"{outcomes.quarantined_total} {dict(outcomes.quarantined)}"
        + (
            f", and {sum(outcomes.partial.values())} samples of stored uploads {dict(outcomes.partial)}"
            if outcomes.partial
            else ""
        )
    )
    say(
        f"{region}: reconciliation: produced {produced} = stored {stored} + dead-lettered "
        f"{outcomes.deadlettered_total} + quarantined {outcomes.quarantined_total} -> "
        f"{'OK' if accounted == produced else f'MISMATCH ({accounted})'}"
    )
    return accounted == produced


def _scan(
    stacks: dict[str, Settings],
    region: str,
    fleet: list[Vehicle],
    positions: dict[str, set[float]],
) -> bool:
    """Nothing of the other region anywhere in this one: topics, tables, files."""
    settings = stacks[region]
    started = time.monotonic()
    ids = foreign_to(region, fleet, positions)
    report = scan_region(settings, ids)
    say(
        f"{region}: separation scan for {len(ids.strings)} VINs/owner ids and "
        f"{len(ids.positions)} positions of other regions: {report.summary()} "
        f"({time.monotonic() - started:.1f} s)"
    )
    for hit in report.hits[:5]:
        say(f"    found {hit.identifier} in {hit.place}")
    return not report.hits


def _show_owner_api(settings: Settings, url: str, owner: str) -> None:
    """What an owner's app does: list vehicles, export everything, share a little."""
    region = settings.region
    ring = load_keyring(settings)
    token = issue(ring, owner_claims(owner, region, 600))
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as api:
        vehicles = api.get("/v1/vehicles").json()["vehicles"]
        started = time.monotonic()
        export = api.get("/v1/export", params={"format": "parquet"})
        took = time.monotonic() - started
        manifest = json.loads(zipfile.ZipFile(io.BytesIO(export.content)).read("manifest.json"))
        grant = api.post(
            "/v1/grants", json={"party": "Insurer", "scopes": ["driving"], "expires_in_s": 3600}
        ).json()
    say(
        f"\nowner API {region}, {owner}: GET /v1/vehicles -> {len(vehicles)} vehicles; "
        f"GET /v1/export?format=parquet -> {len(export.content) / 1024:.0f} KiB in {took:.2f} s, "
        f"manifest {manifest['row_counts']}"
    )
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {grant['token']}"}) as party:
        vin = vehicles[0]["vin"]
        speed = party.get(f"/v1/vehicles/{vin}/samples", params={"signals": "speed", "limit": 5})
        where = party.get(f"/v1/vehicles/{vin}/samples", params={"signals": "latitude"})
        trips = party.get("/v1/trips", params={"limit": 1})
    trip_columns = sorted(trips.json()["trips"][0]) if trips.json()["trips"] else []
    say(
        f"  grant to 'Insurer' (scope driving): speed -> {speed.status_code} "
        f"({len(speed.json()['samples'])} samples), latitude -> {where.status_code} "
        f"{where.json()['error']}, a trip shows {trip_columns}"
    )
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
        log = api.get("/v1/audit").json()["entries"]
    say(
        f"  access log: {len(log)} entries, e.g. "
        + "; ".join(
            f"{e['actor']} {e['action']} {e['resource']} ({e['rows']} rows, {e['status']})"
            for e in log[:3]
        )
    )


def _show_sale(settings: Settings, url: str, sold: Vehicle) -> None:
    """The seller sees the car until the sale, the buyer from it: nothing of the other."""
    ring = load_keyring(settings)
    seller, buyer = sold.periods[0].owner_id, sold.periods[1].owner_id
    window = {"vin": sold.vin}
    seen = {}
    for owner in (seller, buyer):
        token = issue(ring, owner_claims(owner or "", settings.region, 600))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
            vehicles = {v["vin"]: v for v in api.get("/v1/vehicles").json()["vehicles"]}
            trips = api.get("/v1/trips", params=window).json().get("trips", [])
        mine = vehicles.get(sold.vin, {})
        seen[owner] = (
            mine.get("samples", 0),
            mine.get("first_sample_at"),
            mine.get("last_sample_at"),
            len(trips),
        )
    sale_at = time.strftime("%H:%M:%S", time.gmtime(sold.periods[1].from_ms / 1000))
    say(
        f"  sale of {sold.vin} at {sale_at} UTC: "
        + "; ".join(
            f"{o} sees {n} samples from {first} to {last}, {t} trips"
            for o, (n, first, last, t) in seen.items()
        )
    )


def _most_active_owner(truth: GroundTruth, registered: list[Vehicle], region: str) -> str:
    """The owner with the most vehicles, then the most distance: the richest report."""
    owners = {v.owner_id for v in registered if v.region == region and not v.history}
    return max(
        sorted(owners),
        key=lambda o: (len(truth.by_owner(o)), sum(t.distance_km for t in truth.by_owner(o))),
    )

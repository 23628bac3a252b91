"""`vtp demo` / `make demo`: two region stacks, each on its own local Kafka broker, a
simulated fleet whose vehicles publish to their own region (half of them through the
region's vehicle gateway, over mutual TLS with their own certificates and spools), the
real workers, sinks, owner APIs and gateways as processes, a vehicle that loses its
gateway and catches up, a forged certificate refused, counts that add up per region, a
scan that finds nothing of one region in the other, and what owners see."""

from __future__ import annotations

import io
import json
import shutil
import time
import uuid
import zipfile
from dataclasses import replace
from datetime import UTC, datetime

import httpx

from deploy.broker import fetch_jars, start_broker, stop_broker
from owner_api.tokens import issue, owner_claims
from producers.faults import fault_messages
from producers.pki import forge_vehicle, init_region
from producers.publish import (
    ending_now,
    flush_all,
    publish_fleet,
    publishers_for,
    register_fleet,
)
from producers.simulator import GroundTruth, Vehicle, build_fleet
from producers.uplink import VehicleCredentials, VehicleUplink
from schemas import default_store
from schemas.registry import Period
from vtp.core.keys import load_keyring
from vtp.core.regions import REGIONS
from vtp.core.settings import Settings
from vtp.core.warehouse import open_warehouse, rows
from vtp.demo_edge import (
    OutOfReach,
    busiest,
    close_uplinks,
    handshake_answer,
    vehicle_credentials,
)
from vtp.harness import (
    NotDrained,
    read_outcomes,
    start_gateway,
    start_region,
    topic_message_count,
    vehicle_upload_ids,
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
        say("stopped: workers, owner services (with their sinks), gateways, brokers")


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


# The simulator sends a vehicle's hour of uploads within seconds, where a real vehicle
# sends one every ~10 s (the gateway's defaults: 2 a second, 60 at once).
DEMO_GATEWAY_RATE, DEMO_GATEWAY_BURST = 1000.0, 1000
# The stretch of the hour (as fractions) one EU vehicle spends out of its gateway's reach.
OUT_OF_REACH = (1 / 3, 2 / 3)


def _run_on_brokers(stacks: dict[str, Settings], seed: int, minutes: float) -> int:
    processes = []
    uplinks: dict[str, VehicleUplink | OutOfReach] = {}
    start_ms = ending_now(minutes * 60)  # the last hour: in the owner API's default window
    fleet, changed = fleet_with_changes(seed, start_ms, minutes)
    registered, unregistered = fleet[:-2], fleet[-2:]  # two gateways nobody registered
    try:
        urls, gateways = {}, {}
        for region, settings in stacks.items():
            started, urls[region] = start_region(settings)
            processes += started
            init_region(settings.pki_path, region)  # `vtp pki init`
            gateway, gateways[region] = start_gateway(
                settings.with_(gateway_rate=DEMO_GATEWAY_RATE, gateway_burst=DEMO_GATEWAY_BURST)
            )
            processes.append(gateway)
            register_fleet(settings, registered)
            say(
                f"{region}: vtp worker, vtp serve (sink + owner API at {urls[region]}), "
                f"vtp gateway at {gateways[region]}, "
                f"{sum(region in v.regions for v in registered)} vehicles in its registry"
            )
        sold, moved = changed["sold"], changed["moved"]
        say(
            f"fleet: {len({v.owner_id for v in fleet})} owners, {len(fleet)} vehicles, each sending "
            f"to its own region; {len(unregistered)} not in any registry; halfway "
            f"{sold.vin} is sold (eu) and {moved.vin} moves from cn to eu"
        )

        eu_vehicle = next(v for v in registered if v.region == "eu" and not v.history)
        lost = _open_uplinks(
            uplinks, stacks, gateways, registered, eu_vehicle, seed, start_ms, minutes
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
            uplinks=uplinks,
        )
        stranger = next(v for v in unregistered if v.region == "eu")
        faults = fault_messages(
            eu_vehicle.vin, stranger.vin, published.first_uploads[eu_vehicle.vin], start_ms
        )
        for fault in faults:
            publishers["eu"].publish_raw(
                fault.key, fault.value, f"fault:{fault.reason}", fault.created_ms
            )
        report = flush_all(publishers)
        edge, waiting = close_uplinks(uplinks, timeout=120)
        produced = dict(published.uploads_by_region)
        produced["eu"] += len(faults)
        say(
            f"produced: {published.uploads} uploads with {published.samples} samples "
            f"({minutes:g} simulated minutes) + {len(faults)} bad messages (eu): "
            + ", ".join(f"{r} {n} messages" for r, n in sorted(produced.items()))
            + f"; {report.delivered} delivered to Kafka, {len(report.failed)} failed; "
            f"{sum(published.via_gateway.values())} through the gateways: {edge.acknowledged} "
            f"acknowledged, {len(edge.refused)} refused, {sum(edge.retried.values())} retried"
            + (f" {edge.retried}" if edge.retried else "")
        )
        if waiting or edge.refused:
            say(f"gateways: {waiting} uploads never acknowledged; refused {edge.refused[:3]}")
            return 1
        offline = uplinks[lost.vin]
        assert isinstance(offline, OutOfReach)
        say(offline.story("eu"))
        forged_id, refused = _impostor(
            stacks["eu"], gateways["eu"], eu_vehicle, published.first_uploads[eu_vehicle.vin][1]
        )

        since = time.monotonic()
        try:
            wait_drained(list(stacks.values()), processes, timeout=240)
        except NotDrained as exc:
            say(str(exc))
            return 1
        say(f"drained {time.monotonic() - since:.1f} s after the last upload was acknowledged")
        caught_up = _show_catch_up(stacks["eu"], urls["eu"], lost, offline)
        owners = {r: _most_active_owner(published.truth, registered, r) for r in stacks}
        for region, settings in stacks.items():
            _show_owner_api(settings, urls[region], owners[region])
        _show_sale(stacks["eu"], urls["eu"], sold)
    finally:
        for link in uplinks.values():
            link.close()
        for p in processes:
            p.stop()

    balanced = all(_reconcile(settings) for settings in stacks.values())
    absent = _forged_absent(stacks["eu"], eu_vehicle.vin, forged_id)
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
    return 0 if balanced and clean and caught_up and refused and absent else 1


def _open_uplinks(
    uplinks: dict[str, VehicleUplink | OutOfReach],
    stacks: dict[str, Settings],
    gateways: dict[str, str],
    registered: list[Vehicle],
    keep_online: Vehicle,
    seed: int,
    start_ms: int,
    minutes: float,
) -> Vehicle:
    """Fills ``uplinks``: half the vehicles that stay in one region upload through its
    gateway, each with its own certificate and spool; the others publish straight to its
    Kafka, as trusted in-region producers do. Returns the EU vehicle that will lose its
    gateway for a while (OUT_OF_REACH)."""
    through = [v for v in registered if v.regions == {v.region}][::2]
    lost_ms, back_ms = (start_ms + int(f * minutes * 60_000) for f in OUT_OF_REACH)
    lost = busiest(
        [v for v in through if v.region == "eu" and not v.history and v is not keep_online],
        seed,
        start_ms,
        minutes,
        (lost_ms, back_ms),
    )
    for v in through:
        settings = stacks[v.region]
        credentials = vehicle_credentials(settings, v.vin)
        folder = settings.home / "spool" / v.vin
        # Their spools share this machine's disk, where each real vehicle has its own:
        # they skip fsync (the demo crashes no vehicle); the one that loses its gateway
        # keeps it.
        uplinks[v.vin] = (
            OutOfReach(gateways[v.region], credentials, folder, lost_ms, back_ms)
            if v is lost
            else VehicleUplink(gateways[v.region], credentials, folder, fsync=False)
        )
    say(
        f"gateways: {len(through)} vehicles ("
        + ", ".join(f"{r} {sum(v.region == r for v in through)}" for r in stacks)
        + ") upload through their region's vtp gateway over mutual TLS, each with its own "
        "certificate (vtp pki) and spool (<region>/spool/<VIN>); the others publish "
        "straight to Kafka"
    )
    say(
        f"gateways: VTP_GATEWAY_RATE={DEMO_GATEWAY_RATE:g} VTP_GATEWAY_BURST="
        f"{DEMO_GATEWAY_BURST} per vehicle, as the simulator sends a vehicle's hour in "
        "seconds (a real vehicle uploads every ~10 s)"
    )
    return lost


def _impostor(
    settings: Settings, url: str, victim: Vehicle, first_upload: bytes
) -> tuple[str, bool]:
    """A device with a certificate for ``victim``'s VIN from a forged CA (named like the
    region's vehicle CA, with another key) replays the victim's first upload under a new
    id: the gateway refuses its TLS handshake. Returns that upload's id, and whether it
    was refused (no stream, nothing acknowledged)."""
    region = settings.need_region()
    forged = forge_vehicle(settings.home / "forged", victim.vin, region)
    credentials = VehicleCredentials(
        forged.cert_path, forged.key_path, settings.pki_path / "edge-ca.pem"
    )
    upload, _ = default_store().decode(first_upload)
    upload["upload_id"] = str(uuid.uuid4())
    uplink = VehicleUplink(url, credentials, settings.home / "spool" / f"forged-{victim.vin}")
    try:
        uplink.send(upload)
        uplink.wait_acknowledged(3)
    finally:
        report = uplink.close()
    say(
        f"{region}: a forged certificate for {victim.vin} (from a CA named like {region}'s "
        f"vehicle CA, with another key): {handshake_answer(url, credentials)}; the vehicle "
        f"SDK saw {report.connect_failures} connections fail ({report.last_error}), "
        f"{report.connects} streams open, {report.acknowledged} uploads acknowledged"
    )
    return str(upload["upload_id"]), report.connects == 0 and report.acknowledged == 0


def _show_catch_up(settings: Settings, url: str, vehicle: Vehicle, link: OutOfReach) -> bool:
    """The vehicle's uploads are in Kafka once each, in the order it sent them, and its
    owner sees the samples it spooled."""
    in_kafka = vehicle_upload_ids(settings, vehicle.vin)
    first, last = link.spooled_span
    token = issue(load_keyring(settings), owner_claims(vehicle.owner_id, settings.region, 600))
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as api:
        page = api.get(
            f"/v1/vehicles/{vehicle.vin}/samples",
            params={
                "signals": "speed",
                "start": _iso(first),
                "end": _iso(last + 1),
                "limit": 10_000,
            },
        ).json()
    seen = len(page.get("samples", []))
    in_order = in_kafka == link.sent
    say(
        f"  {vehicle.vin}: {len(in_kafka)} uploads in Kafka, "
        + (
            "each once, in the order it sent them"
            if in_order
            else f"NOT the {len(link.sent)} it sent, once each in order"
        )
        + f"; its owner {vehicle.owner_id} sees {seen} of the {link.spooled_samples} samples "
        f"it spooled (GET /v1/vehicles/{vehicle.vin}/samples)"
    )
    return in_order and seen == link.spooled_samples and link.caught_up


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _forged_absent(settings: Settings, vin: str, upload_id: str) -> bool:
    """Nothing of the forged vehicle's upload in Kafka or the warehouse."""
    in_kafka = vehicle_upload_ids(settings, vin).count(upload_id)
    wh = open_warehouse(settings)
    stored: int
    try:
        ((stored,),) = rows(
            wh.query("SELECT count() FROM uploads WHERE upload_id = {u:String}", {"u": upload_id})
        )
    finally:
        wh.close()
    say(
        f"{settings.region}: the forged certificate's upload {upload_id}: {in_kafka} in Kafka, "
        f"{stored} in the warehouse -> {'OK' if in_kafka == stored == 0 else 'LEAKED'}"
    )
    return in_kafka == stored == 0


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

"""Two regions, each a stack of its own on a broker of its own, as operators deploy them.

A mixed fleet runs through both stacks. Halfway, registry events happen the way they
do in life: a car registered in CN moves to the EU, another is deregistered in CN; and a
car in the EU is sold in the middle of a drive. Then:
- each region's broker (every topic), warehouse (every table) and folders (every file)
  hold nothing of the other region: no VIN, owner id or position (and the scan finds
  an identifier planted on purpose, so "nothing found" means something);
- every sample, trip, charge, day and open session belongs to the owner and region in
  force at its event time, through the owner API and its export;
- counts reconcile per region: produced = stored + dead-lettered + quarantined.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from dataclasses import replace
from datetime import datetime
from zoneinfo import ZoneInfo

import httpx
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from deploy.broker import fetch_jars, start_broker, stop_broker
from owner_api.tokens import issue, owner_claims
from producers.publish import DEFAULT_START_MS, flush_all, publishers_for, register_fleet
from producers.simulator import Vehicle, build_fleet, new_truth, simulate
from schemas.registry import Period
from vtp.core.keys import load_keyring
from vtp.core.regions import REGIONS
from vtp.core.settings import load_settings
from vtp.core.warehouse import open_warehouse, rows
from vtp.harness import read_outcomes, start_region, topic_message_count, wait_drained
from vtp.scan import (
    Identifiers,
    foreign_to,
    scan_files,
    scan_region,
    scan_topics,
    scan_warehouse,
)

pytestmark = pytest.mark.e2e

SEED = 17
HOURS = 4
MID = DEFAULT_START_MS + HOURS * 3_600_000 // 2  # the move and the deregistration
BUYER = "owner-buyer-1"
FAR_PAST, FAR_FUTURE = "2026-06-01T00:00:00Z", "2027-05-01T00:00:00Z"  # within 366 days


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def _plan() -> tuple[list[Vehicle], dict[str, Vehicle], int]:
    """The fleet with its registration histories: which car is sold, moved, deregistered."""
    fleet = build_fleet(SEED, owners=8, vehicles=12, regions=tuple(REGIONS))
    truth = new_truth(fleet)
    for _ in simulate(
        fleet, seed=SEED, start_ms=DEFAULT_START_MS, duration_s=HOURS * 3600, truth=truth
    ):
        pass
    # sold in the middle of its longest trip of the first half, which the seller began
    eu = [v for v in fleet if v.region == "eu"]
    sold, trip = max(
        ((v, t) for v in eu for t in truth.vehicles[v.vin].trips if t.end_ms < MID),
        key=lambda vt: vt[1].end_ms - vt[1].start_ms,
    )
    sale = (trip.start_ms + trip.end_ms) // 2 + 500
    cn = [v for v in fleet if v.region == "cn"]
    moved, gone = cn[0], cn[1]
    changed = {
        "sold": replace(sold, history=(Period(0, sold.owner_id, "eu"), Period(sale, BUYER, "eu"))),
        "moved": replace(
            moved, history=(Period(0, moved.owner_id, "cn"), Period(MID, moved.owner_id, "eu"))
        ),
        "gone": replace(gone, history=(Period(0, gone.owner_id, "cn"), Period(MID, None, None))),
    }
    by_vin = {v.vin: v for v in changed.values()}
    return [by_vin.get(v.vin, v) for v in fleet], changed, sale


def _send(uploads, fleet_by_vin, publishers, positions) -> Counter:
    """Each upload to the region its vehicle is provisioned with then."""
    sent: Counter = Counter()
    for upload in uploads:
        region = fleet_by_vin[upload["vin"]].endpoint_at(upload["samples"][-1]["event_time_ms"])
        publishers[region].publish_upload(upload)
        positions.setdefault(region, set()).update(
            x for s in upload["samples"] for x in (s["latitude"], s["longitude"])
        )
        sent[region] += 1
    return sent


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    base = load_settings({}).with_(
        data_dir=root, sink_batch_messages=200, sink_flush_ms=300, sink_aggregates_flush_ms=300
    )
    fetch_jars(base)
    fleet, changed, sale = _plan()
    before = [
        replace(v, history=()) if v in (changed["moved"], changed["gone"]) else v for v in fleet
    ]
    stacks, processes, urls = {}, [], {}
    try:
        for region in REGIONS:
            settings = base.with_(region=region)
            state = start_broker(settings)
            stacks[region] = settings = settings.with_(kafka_bootstrap=state.bootstrap)
            started, urls[region] = start_region(settings)
            processes += started
            register_fleet(settings, before)
        truth = new_truth(fleet)
        uploads = list(
            simulate(
                fleet, seed=SEED, start_ms=DEFAULT_START_MS, duration_s=HOURS * 3600, truth=truth
            )
        )
        by_vin = {v.vin: v for v in fleet}
        publishers = publishers_for(stacks)
        positions: dict[str, set[float]] = {}
        first = [u for u in uploads if u["samples"][-1]["event_time_ms"] < MID]
        rest = [u for u in uploads if u["samples"][-1]["event_time_ms"] >= MID]
        sent = _send(first, by_vin, publishers, positions)
        assert flush_all(publishers).ok
        assert wait_drained(list(stacks.values()), processes, timeout=300)
        # Halfway: the move and the deregistration reach the registries (the sale was
        # known from the start), and the workers apply them before the cars send on.
        for settings in stacks.values():
            register_fleet(settings, [changed["moved"], changed["gone"]])
        assert wait_drained(list(stacks.values()), processes, timeout=120)
        sent += _send(rest, by_vin, publishers, positions)
        assert flush_all(publishers).ok
        publishers.clear()  # no client of the brokers outlives them
        assert wait_drained(list(stacks.values()), processes, timeout=300)
        yield {
            "stacks": stacks,
            "urls": urls,
            "fleet": fleet,
            "changed": changed,
            "sale": sale,
            "uploads": uploads,
            "sent": sent,
            "positions": positions,
            "processes": processes,
            "truth": truth,
        }
    finally:
        for p in processes:
            p.stop()
        for settings in stacks.values():
            stop_broker(settings)


def _stopped(regions) -> None:
    """The services own their warehouses: stop them before reading the folders (the
    tests that ask the owner APIs come first in this module)."""
    for p in regions["processes"]:
        p.stop()


def _expected_samples(regions, region: str) -> Counter:
    """(vin, owner) -> samples the region must hold: those sent there, registered there."""
    expected: Counter = Counter()
    fleet = {v.vin: v for v in regions["fleet"]}
    for upload in regions["uploads"]:
        vehicle = fleet[upload["vin"]]
        if vehicle.endpoint_at(upload["samples"][-1]["event_time_ms"]) != region:
            continue
        registration = vehicle.registration_in(region)
        for s in upload["samples"]:
            period = registration.here(region, s["event_time_ms"])
            if period is not None:
                expected[(vehicle.vin, period.owner_id)] += 1
    return expected


def _api(regions, region: str, owner: str) -> httpx.Client:
    ring = load_keyring(regions["stacks"][region])
    token = issue(ring, owner_claims(owner, region, 600))
    return httpx.Client(
        base_url=regions["urls"][region], headers={"Authorization": f"Bearer {token}"}, timeout=120
    )


def _everything_about(api: httpx.Client, vin: str) -> dict[str, list]:
    """Every record of ``vin`` the caller can reach: each route, then the export."""
    window = {"start": FAR_PAST, "end": FAR_FUTURE}
    out: dict[str, list] = {}
    samples, cursor = [], None
    while True:
        params = {**window, "limit": 10_000, **({"cursor": cursor} if cursor else {})}
        r = api.get(f"/v1/vehicles/{vin}/samples", params=params)
        if r.status_code == 404:
            break
        assert r.status_code == 200, r.text
        body = r.json()
        samples += body["samples"]
        cursor = body["next"]
        if cursor is None:
            break
    out["samples"] = samples
    for route in ("trips", "charges", "daily-summaries"):
        r = api.get(f"/v1/{route}", params={**window, "limit": 10_000})
        out[route] = [x for x in r.json()[route.replace("-", "_")] if x["vin"] == vin]
    export = api.get("/v1/export", params={"format": "jsonl"})
    archive = zipfile.ZipFile(io.BytesIO(export.content))
    for name in ("samples", "uploads", "trips", "charges", "daily_summaries", "open_sessions"):
        lines = archive.read(f"{name}.jsonl").decode().splitlines()
        out[f"export {name}"] = [r for r in map(json.loads, lines) if r["vin"] == vin]
    return out


def _moments(record: dict, with_reception: bool = False) -> list[int]:
    """The instants a record is about (a day: its local date, checked separately). With
    ``with_reception``, also when its upload was sent and received: meaningful where the
    registry knew the change before the data came (here the data is old, its reception
    is today)."""
    keys = ("event_time", "start_time", "end_time", "first_event_time", "last_event_time")
    if with_reception:
        keys += ("sent_at", "received_at")
    return [_ms(record[k]) for k in keys if record.get(k)]


def test_the_sale_splits_the_car_between_seller_and_buyer_on_every_route(regions):
    sold, sale = regions["changed"]["sold"], regions["sale"]
    seller = sold.periods[0].owner_id
    seen = {}
    for owner in (seller, BUYER):
        with _api(regions, "eu", owner) as api:
            seen[owner] = _everything_about(api, sold.vin)
    expected = _expected_samples(regions, "eu")
    assert len(seen[seller]["samples"]) == expected[(sold.vin, seller)] > 0
    assert len(seen[BUYER]["samples"]) == expected[(sold.vin, BUYER)] > 0
    for owner, inside in ((seller, lambda t: t < sale), (BUYER, lambda t: t >= sale)):
        for what, records in seen[owner].items():
            for record in records:
                assert all(inside(t) for t in _moments(record, True)), (owner, what, record)
    # mid-trip: the seller's trip ends before the sale, the buyer's begins at it
    trip = next(
        t for t in regions["truth"].vehicles[sold.vin].trips if t.start_ms < sale < t.end_ms
    )
    assert any(_ms(t["start_time"]) == trip.start_ms for t in seen[seller]["trips"])
    buyer_trips = seen[BUYER]["trips"] + [
        s for s in seen[BUYER]["export open_sessions"] if s["kind"] == "trip" and s["active"]
    ]
    assert min(_ms(t["start_time"]) for t in buyer_trips) < trip.end_ms
    # mid-day: each has a summary of the day of the sale, of their own hours only
    day = datetime.fromtimestamp(sale / 1000, ZoneInfo(sold.time_zone)).date().isoformat()
    for owner in (seller, BUYER):
        assert any(d["date"] == day for d in seen[owner]["export daily_summaries"]), owner
    # the seller's open slots were emptied at the sale
    assert not [s for s in seen[seller]["export open_sessions"] if s["active"]]


def test_the_move_leaves_the_time_before_in_cn_and_the_time_after_in_the_eu(regions):
    moved = regions["changed"]["moved"]
    owner = moved.periods[0].owner_id
    with _api(regions, "cn", owner) as api:
        cn = _everything_about(api, moved.vin)
    with _api(regions, "eu", owner) as api:
        eu = _everything_about(api, moved.vin)
    assert len(cn["samples"]) == _expected_samples(regions, "cn")[(moved.vin, owner)] > 0
    assert len(eu["samples"]) == _expected_samples(regions, "eu")[(moved.vin, owner)] > 0
    for what, records in cn.items():
        assert all(t < MID for r in records for t in _moments(r)), what
    for what, records in eu.items():
        assert all(t >= MID for r in records for t in _moments(r)), what
    # CN closed the car's sessions at the move although no more of its samples came
    assert not [s for s in cn["export open_sessions"] if s["active"]]


def test_counts_reconcile_in_each_region(regions):
    for region, settings in regions["stacks"].items():
        produced = topic_message_count(settings, settings.topics.uploads)
        assert produced == regions["sent"][region]
        outcomes = read_outcomes(settings)
        wh_rows = _query(regions, region, "SELECT uniqExact(upload_id) FROM uploads")
        stored = wh_rows[0][0]
        assert produced == stored + outcomes.deadlettered_total + outcomes.quarantined_total, (
            region,
            stored,
            outcomes,
        )


def _query(regions, region, sql, params=None):
    """A query through a short-lived warehouse handle (the service is stopped first)."""
    _stopped(regions)
    wh = open_warehouse(regions["stacks"][region])
    try:
        return rows(wh.query(sql, params))
    finally:
        wh.close()


def test_a_deregistered_cars_later_uploads_are_quarantined_and_its_sessions_closed(regions):
    gone = regions["changed"]["gone"]
    after = [
        u
        for u in regions["uploads"]
        if u["vin"] == gone.vin and u["samples"][-1]["event_time_ms"] >= MID
    ]
    whole = sum(1 for u in after if u["samples"][0]["event_time_ms"] >= MID)
    partial = sum(1 for u in after for s in u["samples"] if s["event_time_ms"] >= MID) - sum(
        len(u["samples"]) for u in after if u["samples"][0]["event_time_ms"] >= MID
    )
    outcomes = read_outcomes(regions["stacks"]["cn"])
    assert outcomes.quarantined["deregistered"] == whole > 0
    assert outcomes.partial["deregistered"] == partial
    stored_after = _query(
        regions,
        "cn",
        "SELECT count() FROM samples WHERE vin = {v:String} AND event_time >= fromUnixTimestamp64Milli({t:Int64})",
        {"v": gone.vin, "t": MID},
    )
    assert stored_after == [(0,)]
    active = _query(
        regions,
        "cn",
        "SELECT count() FROM open_sessions FINAL WHERE vin = {v:String} AND active",
        {"v": gone.vin},
    )
    assert active == [(0,)]


def test_every_sample_is_stored_once_under_the_owner_in_force_at_its_time(regions):
    for region in regions["stacks"]:
        found = _query(
            regions,
            region,
            "SELECT vin, owner_id, count(), uniqExact(seq) FROM samples GROUP BY vin, owner_id",
        )
        stored = Counter()
        for vin, owner, n, distinct in found:
            assert n == distinct, (region, vin, owner)
            stored[(vin, owner)] = n
        assert stored == _expected_samples(regions, region), region


def test_nothing_of_one_region_is_found_anywhere_in_the_other(regions):
    _stopped(regions)
    for region, settings in regions["stacks"].items():
        ids = foreign_to(region, regions["fleet"], regions["positions"])
        assert ids.strings and len(ids.positions) > 1000
        report = scan_region(settings, ids)
        print(f"\n{region}: {report.summary()}")
        assert report.read["topics"] >= 10 and report.read["messages"] > 1000
        assert report.read["tables"] >= 10 and report.read["files"] > 50
        assert report.hits == [], report.hits[:10]

    # The scan itself finds what is planted: a CN VIN and position in an EU topic, file, row.
    eu, cn_vehicle = (
        regions["stacks"]["eu"],
        next(v for v in regions["fleet"] if v.region == "cn" and not v.history),
    )
    ids = foreign_to("eu", regions["fleet"], regions["positions"])
    cn_position = next(iter(regions["positions"]["cn"] - regions["positions"]["eu"]))
    admin = AdminClient({"bootstrap.servers": eu.bootstrap()})
    admin.create_topics([NewTopic("planted", num_partitions=1, replication_factor=1)])[
        "planted"
    ].result(30)
    producer = Producer({"bootstrap.servers": eu.bootstrap()})
    producer.produce("planted", key=b"k", value=json.dumps({"lat": cn_position}).encode())
    producer.produce("planted", value=f"note about {cn_vehicle.vin}".encode())
    assert producer.flush(30) == 0
    topic_hits = {
        (h.place.split(":")[0], h.identifier) for h in scan_topics(eu.bootstrap(), ids).hits
    }
    assert {
        ("topic planted", cn_vehicle.vin),
        ("topic planted", f"position {cn_position}"),
    } <= topic_hits
    (eu.home / "logs" / "planted.log").write_text(f"{cn_vehicle.owner_id} was here")
    assert [h.identifier for h in scan_files(eu.home / "logs", ids).hits] == [cn_vehicle.owner_id]
    wh = open_warehouse(eu)
    try:
        wh.execute("CREATE TABLE planted (note String) ENGINE = MergeTree ORDER BY tuple()")
        wh.execute("INSERT INTO planted VALUES ({n:String})", {"n": cn_vehicle.vin})
        found = scan_warehouse(wh, Identifiers(ids.strings, frozenset()))
    finally:
        wh.close()
    assert [(h.place, h.identifier) for h in found.hits] == [("table planted", cn_vehicle.vin)]

"""The owner API over real HTTP, against a `vtp serve` process whose warehouse the real
pipeline filled (broker, worker, sink thread): reads, grants, export, erasure, audit,
and every way a caller could reach data that is not theirs."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from owner_api.analyst import AnalystQueryError
from owner_api.scopes import SCOPES
from owner_api.tokens import Claims, analyst_claims, audience, issue, owner_claims
from producers.publish import publish_fleet, register_fleet
from producers.sdk import TelemetryPublisher
from producers.simulator import build_fleet
from vtp.core.keys import load_keyring
from vtp.core.settings import Settings
from vtp.harness import start_serve, start_worker, wait_drained
from vtp.serve import address_file, wait_for_service
from vtp.sql import query_locally_or_via_service

pytestmark = pytest.mark.e2e
RING = {}  # the served region's key ring, for the tokens the tests make

DATA_TABLES = (
    "samples",
    "uploads",
    "trips",
    "charges",
    "daily_summaries",
    "open_sessions",
    "grants",
)


@pytest.fixture(scope="module")
def served(region_stack):
    settings = region_stack(
        "eu",
        "api",
        sink_batch_messages=200,
        sink_flush_ms=300,
        analyst_max_execution_s=3.0,
        export_page_rows=1000,  # many pages: an export can be left half way
        # short gaps: a trip can begin and end within the clock skew allowed after an erasure
        trip_gap_s=60.0,
        charge_gap_s=60.0,
        allowed_lateness_s=30.0,
    )
    ring = RING["eu"] = load_keyring(settings)  # `vtp serve` finds them in the region's folder
    fleet = [v for v in build_fleet(5, owners=12, vehicles=20) if v.region == "eu"]
    register_fleet(settings, fleet)
    worker = start_worker(settings)
    serve = start_serve(settings)
    processes = [worker, serve]
    try:
        url = wait_for_service(settings, serve)
        published = publish_fleet(settings, fleet, seed=5, duration_s=3 * 3600)
        assert published.report.ok
        assert wait_drained(settings, processes, timeout=300)
        yield {
            "settings": settings,
            "fleet": fleet,
            "truth": published.truth,
            "urls": {"eu": url},
            "processes": processes,
            "published": published,
            "ring": ring,
        }
    finally:
        for p in processes:
            p.stop()
    assert not address_file(settings).exists()  # removed on a clean stop


def _owner_in(served, region: str, index: int = 0) -> tuple[str, list[str]]:
    owners = sorted({v.owner_id for v in served["fleet"] if v.region == region})
    owner = owners[index]
    return owner, sorted(
        v.vin for v in served["fleet"] if v.owner_id == owner and v.region == region
    )


def _client(served, region: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=served["urls"][region], headers=headers, timeout=120)


def _owner_token(owner: str, region: str, ttl: int = 600) -> str:
    return issue(RING["eu"], owner_claims(owner, region, ttl))


def _closing_ms(served) -> int:
    """How long after its end a session is closed: its gap, then the lateness."""
    s = served["settings"]
    return int((max(s.trip_gap_s, s.charge_gap_s) + s.allowed_lateness_s) * 1000)


def _closed_trips(served, vin: str) -> list:
    """The simulator's trips that the aggregation has closed: parked long enough after."""
    truth = served["truth"].vehicles[vin]
    return [t for t in truth.trips if truth.last_ms - t.end_ms >= _closing_ms(served)]


def _closed_charges(served, vin: str) -> list:
    truth = served["truth"].vehicles[vin]
    return [c for c in truth.charges if truth.last_ms - c.end_ms >= _closing_ms(served)]


def _truth_samples(served, vin: str) -> int:
    return served["truth"].vehicles[vin].samples


# -- reads ------------------------------------------------------------------------------


def test_an_owner_reads_their_vehicles_samples_trips_charges_and_days(served):
    owner, vins = _owner_in(served, "eu")
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        me = api.get("/v1/me").json()
        assert me["owner_id"] == owner and me["actor"] == "owner" and "location" in me["scopes"]
        vehicles = api.get("/v1/vehicles").json()["vehicles"]
        assert [v["vin"] for v in vehicles] == vins
        for v in vehicles:
            assert v["samples"] == _truth_samples(served, v["vin"])

        vin = vins[0]
        pages, cursor, got = 0, None, []
        while True:
            params = {
                "start": "2026-01-01T00:00:00Z",
                "end": "2027-01-01T00:00:00Z",
                "limit": 500,
                "signals": "speed,soc,latitude",
            }
            if cursor:
                params["cursor"] = cursor
            r = api.get(f"/v1/vehicles/{vin}/samples", params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            got += body["samples"]
            pages += 1
            cursor = body["next"]
            if cursor is None:
                break
        assert len(got) == _truth_samples(served, vin) and pages > 1
        assert set(got[0]) == {"event_time", "seq", "speed", "soc", "latitude"}
        keys = [(s["event_time"], s["seq"]) for s in got]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)  # no overlap between pages

        window = {"start": "2026-01-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
        trips = api.get("/v1/trips", params=window).json()["trips"]
        truth_trips = sum(len(_closed_trips(served, v)) for v in vins)
        assert len(trips) == truth_trips > 0
        assert "start_lat" in trips[0] and "owner_id" not in trips[0]
        charges = api.get("/v1/charges", params=window).json()["charges"]
        assert len(charges) == sum(len(_closed_charges(served, v)) for v in vins)
        days = api.get("/v1/daily-summaries", params={**window, "vin": vin}).json()
        assert days["daily_summaries"] and {d["vin"] for d in days["daily_summaries"]} == {vin}


def test_bad_parameters_get_400_with_the_reason(served):
    owner, vins = _owner_in(served, "eu")
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        url = f"/v1/vehicles/{vins[0]}/samples"
        cases = [
            (
                url,
                {"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
                "bad_time_range",
            ),
            (
                url,
                {"start": "2020-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
                "bad_time_range",
            ),
            (url, {"start": "yesterday"}, "bad_parameter"),
            (url, {"signals": "speed,warp_factor"}, "unknown_signal"),
            (url, {"cursor": "not-a-cursor"}, "bad_cursor"),
            (url, {"limit": 0}, "bad_parameter"),
            ("/v1/vehicles/not-a-vin/samples", {}, "bad_parameter"),
            ("/v1/trips", {"vin": "'; DROP TABLE trips; --"}, "bad_parameter"),
            ("/v1/export", {"format": "xml"}, "bad_parameter"),
        ]
        for path, params, code in cases:
            r = api.get(path, params=params)
            assert (r.status_code, r.json()["error"]) == (400, code), (path, params, r.text)
        r = api.post(
            "/v1/grants", json={"party": "x", "scopes": ["telepathy"], "expires_in_s": 600}
        )
        assert (r.status_code, r.json()["error"]) == (400, "unknown_scope")
        assert api.get("/v1/trips").status_code == 200  # the table is still there


# -- isolation --------------------------------------------------------------------------


def test_no_caller_reaches_another_owners_data(served):
    owner, vins = _owner_in(served, "eu", 0)
    other, other_vins = _owner_in(served, "eu", 1)
    cn_vins = [v.vin for v in build_fleet(5, owners=12, vehicles=20) if v.region == "cn"]
    mine = _owner_token(owner, "eu")
    elsewhere = load_keyring(
        Settings(data_dir=served["settings"].data_dir / "elsewhere", region="eu")
    )
    forged = issue(elsewhere, owner_claims(other, "eu", 600))
    expired = issue(RING["eu"], Claims(other, "eu", int(time.time()) - 120), now=time.time() - 200)
    no_such_owner = _owner_token("owner-9999", "eu")
    cn_ring = load_keyring(Settings(data_dir=served["settings"].data_dir / "cn", region="cn"))
    cn_token = issue(cn_ring, owner_claims(owner, "cn", 600))
    with _client(served, "eu", mine) as api:
        for vin in other_vins + cn_vins:
            r = api.get(f"/v1/vehicles/{vin}/samples")
            assert (r.status_code, r.json()["error"]) == (404, "unknown_vehicle"), vin
            for path in ("/v1/trips", "/v1/charges", "/v1/daily-summaries"):
                r = api.get(path, params={"vin": vin})
                assert (r.status_code, r.json()["error"]) == (404, "unknown_vehicle"), (path, vin)
        grant = api.post(
            "/v1/grants", json={"party": "Curious", "scopes": list(SCOPES), "expires_in_s": 600}
        ).json()
    with _client(served, "eu", grant["token"]) as party:  # a grantee of one owner, all scopes
        for vin in other_vins:
            assert party.get(f"/v1/vehicles/{vin}/samples").status_code == 404
    with _client(served, "eu", mine) as api:
        assert {v["vin"] for v in api.get("/v1/vehicles").json()["vehicles"]} == set(vins)
    for token, status, code in [
        (None, 401, "missing_token"),
        (forged, 401, "forged_token"),
        (expired, 401, "expired_token"),
        ("a.b.c", 401, "malformed_token"),
        (no_such_owner, 404, "unknown_owner"),
        (cn_token, 403, "wrong_region"),
    ]:
        with _client(served, "eu", token) as api:
            for path in (
                "/v1/me",
                "/v1/vehicles",
                f"/v1/vehicles/{vins[0]}/samples",
                "/v1/trips",
                "/v1/export",
                "/v1/audit",
                "/v1/grants",
            ):
                r = api.get(path)
                assert (r.status_code, r.json()["error"]) == (status, code), (path, r.text)


def test_a_grant_opens_only_its_scopes_until_revoked(served):
    owner, vins = _owner_in(served, "eu")
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        r = api.post(
            "/v1/grants", json={"party": "Insurer AG", "scopes": ["driving"], "expires_in_s": 3600}
        )
        assert r.status_code == 201, r.text
        grant, token = r.json()["grant"], r.json()["token"]
        assert grant["scopes"] == ["driving"] and grant["revoked_at"] is None
    with _client(served, "eu", token) as party:
        assert party.get("/v1/me").json()["actor"] == "party:Insurer AG"
        r = party.get(f"/v1/vehicles/{vins[0]}/samples", params={"signals": "speed,odometer"})
        assert r.status_code == 200 and r.json()["samples"]
        default = party.get(f"/v1/vehicles/{vins[0]}/samples").json()
        assert set(default["signals"]) == {"speed", "odometer", "gear"}  # only what it may see
        r = party.get(f"/v1/vehicles/{vins[0]}/samples", params={"signals": "speed,latitude"})
        assert (r.status_code, r.json()["error"]) == (403, "missing_scope")
        window = {"start": "2026-01-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
        trips = party.get("/v1/trips", params=window).json()["trips"]
        assert trips and not {"start_lat", "start_lon", "end_lat", "end_lon"} & set(trips[0])
        assert party.get("/v1/charges").json()["error"] == "missing_scope"
        for path in ("/v1/export", "/v1/audit", "/v1/grants"):
            assert party.get(path).json()["error"] == "owner_only", path
        assert party.post("/v1/erasure").json()["error"] == "owner_only"
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        listed = api.get("/v1/grants").json()["grants"]
        assert grant["grant_id"] in {g["grant_id"] for g in listed}
        r = api.delete(f"/v1/grants/{grant['grant_id']}")
        assert r.status_code == 200 and r.json()["grant"]["revoked_at"] is not None
        other, _ = _owner_in(served, "eu", 1)
    with _client(served, "eu", _owner_token(other, "eu")) as api:
        r = api.delete(f"/v1/grants/{grant['grant_id']}")  # not theirs to revoke
        assert (r.status_code, r.json()["error"]) == (404, "unknown_grant")
    with _client(served, "eu", token) as party:
        r = party.get("/v1/me")
        assert (r.status_code, r.json()["error"]) == (401, "revoked_token")


# -- export and audit -------------------------------------------------------------------


def _export(served, region: str, owner: str, fmt: str) -> tuple[dict, zipfile.ZipFile]:
    with _client(served, region, _owner_token(owner, region)) as api:
        r = api.get("/v1/export", params={"format": fmt})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    return json.loads(archive.read("manifest.json")), archive


def _rows_in(archive: zipfile.ZipFile, name: str, fmt: str) -> int:
    data = archive.read(f"{name}.{fmt}")
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)).num_rows
    if fmt == "csv":
        return len(list(csv.DictReader(io.StringIO(data.decode()))))
    return len([json.loads(line) for line in data.decode().splitlines()])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export_holds_every_row_and_the_manifest_says_how_many(served, fmt):
    owner, vins = _owner_in(served, "eu", 3)
    manifest, archive = _export(served, "eu", owner, fmt)
    assert manifest["owner_id"] == owner and manifest["format"] == fmt
    counts = manifest["row_counts"]
    assert counts["samples"] == sum(_truth_samples(served, v) for v in vins)
    assert counts["uploads"] == sum(served["truth"].vehicles[v].uploads for v in vins)
    assert counts["trips"] >= 1
    for name in manifest["files"]:
        table = name.rsplit(".", 1)[0]
        assert _rows_in(archive, table, fmt) == counts[table], name
    if fmt == "jsonl":
        first = json.loads(archive.read("samples.jsonl").decode().splitlines()[0])
        assert first["owner_id"] == owner and first["vin"] in vins


def test_the_access_log_records_every_access_with_its_rows(served):
    owner, vins = _owner_in(served, "eu", 4)
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        n = len(api.get(f"/v1/vehicles/{vins[0]}/samples", params={"limit": 7}).json()["samples"])
        api.get("/v1/vehicles/WVWZZZ1JZXW000001/samples")  # not theirs: denied, logged
        grant = api.post(
            "/v1/grants", json={"party": "Garage", "scopes": ["diagnostics"], "expires_in_s": 600}
        ).json()
    with _client(served, "eu", grant["token"]) as party:
        party.get(f"/v1/vehicles/{vins[0]}/samples", params={"signals": "dtcs", "limit": 3})
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        entries = api.get("/v1/audit").json()["entries"]
    by = {(e["actor"], e["action"], e["resource"]): e for e in entries}
    assert by[("owner", "read", f"samples/{vins[0]}")]["rows"] == n == 7
    denied = by[("owner", "denied", "/v1/vehicles/<vin>/samples")]
    assert denied["status"] == 404 and denied["detail"] == "unknown_vehicle"
    assert "WVWZZZ1JZXW000001" not in str(entries)  # maybe another owner's: not kept here
    assert by[("owner", "grant", f"grants/{grant['grant']['grant_id']}")]["rows"] == 1
    party_read = by[("party:Garage", "read", f"samples/{vins[0]}")]
    assert party_read["rows"] == 3 and party_read["grant_id"] == grant["grant"]["grant_id"]
    other, _ = _owner_in(served, "eu", 0)
    with _client(served, "eu", _owner_token(other, "eu")) as api:
        theirs = api.get("/v1/audit").json()["entries"]
    assert not {e["request_id"] for e in theirs} & {e["request_id"] for e in entries}


# -- analysts ---------------------------------------------------------------------------


def test_analysts_query_the_running_service_and_see_no_identities(served):
    settings = served["settings"]
    eu = [v for v in served["fleet"] if v.region == "eu"]
    columns, found = query_locally_or_via_service(
        settings,
        "SELECT owner_ref, count() AS n FROM analyst_samples GROUP BY owner_ref ORDER BY owner_ref",
    )
    assert columns == ["owner_ref", "n"]
    assert sum(n for _, n in found) == sum(_truth_samples(served, v.vin) for v in eu)
    assert len(found) == len({v.owner_id for v in eu})
    assert not any(v.owner_id in str(found) or v.vin in str(found) for v in eu)
    with pytest.raises(AnalystQueryError, match="not open to analysts"):
        query_locally_or_via_service(settings, "SELECT owner_id FROM samples")
    analyst = issue(RING["eu"], analyst_claims("someone", "eu", 60))
    with _client(served, "eu", analyst) as api:
        r = api.get("/v1/vehicles")
        assert (r.status_code, r.json()["error"]) == (401, "wrong_kind_token")
    with _client(served, "eu", _owner_token(eu[0].owner_id, "eu")) as api:
        r = api.post("/v1/analyst/sql", json={"sql": "SELECT 1"})
        assert (r.status_code, r.json()["error"]) == (401, "wrong_kind_token")


# -- erasure ----------------------------------------------------------------------------


def test_erasure_removes_everything_and_a_replay_does_not_bring_it_back(served):
    settings = served["settings"]
    owner, vins = _owner_in(served, "eu", 2)
    token = _owner_token(owner, "eu")
    with _client(served, "eu", token) as api:
        api.post("/v1/grants", json={"party": "P", "scopes": ["battery"], "expires_in_s": 600})
        before = _export(served, "eu", owner, "jsonl")[0]["row_counts"]
        assert before["samples"] > 0 and before["grants"] == 1
        page = api.get(f"/v1/vehicles/{vins[0]}/samples", params={"limit": 1})
        assert page.status_code == 200 and page.json()["samples"]  # "theirs" is remembered
        r = api.post("/v1/erasure")
        assert r.status_code == 202, r.text  # accepted: it runs as a job
        erasure = r.json()["erasure"]
        assert erasure["status"] == "pending" and erasure["completed_at"] is None
        erasure = _finished(api, erasure["erasure_id"])
        assert erasure["rows_deleted"]["samples"] == before["samples"]
        gone = api.get(f"/v1/vehicles/{vins[0]}/samples", params={"limit": 1})
        assert gone.status_code == 404 and gone.json()["error"] == "unknown_vehicle"

    # Replay: the owner's original messages again, byte for byte, plus older data sent
    # late under new upload ids. None of it may be stored; new data after the erasure is.
    publisher = TelemetryPublisher(settings.bootstrap(), settings.topics.uploads, schema_version=1)
    for vin in vins:
        key, value = served["published"].first_uploads[vin]
        publisher.publish_raw(key, value, f"replay-{vin}")
    late = _late_copy(served, vins[0])
    publisher.publish_upload(late)
    fresh = _fresh_upload(vins[0])
    driving, parked = (
        dict(fresh, samples=fresh["samples"][:6]),
        dict(fresh, upload_id=str(uuid.uuid4()), samples=fresh["samples"][6:]),
    )
    publisher.publish_upload(driving)  # the trip is open: its slot becomes active
    assert publisher.flush(60).ok
    assert wait_drained(settings, served["processes"], timeout=120)
    publisher.publish_upload(parked)  # and ends
    assert publisher.flush(60).ok
    assert wait_drained(settings, served["processes"], timeout=120)

    after = _export(served, "eu", owner, "jsonl")
    counts = after[0]["row_counts"]
    assert counts["samples"] == len(fresh["samples"]) and counts["uploads"] == 2
    assert counts["trips"] == 1  # the new trip, after the erasure
    assert all(counts[t] == 0 for t in ("charges", "grants"))
    # its open slot was emptied when it ended: nothing stays "ongoing" after an erasure
    slots = [json.loads(x) for x in after[1].read("open_sessions.jsonl").decode().splitlines()]
    assert slots and not [s for s in slots if s["active"]]
    stored = [json.loads(x) for x in after[1].read("uploads.jsonl").decode().splitlines()]
    assert sorted(u["upload_id"] for u in stored) == sorted(
        [driving["upload_id"], parked["upload_id"]]
    )
    with _client(served, "eu", token) as api:
        log = api.get("/v1/audit").json()["entries"]
        (done,) = api.get("/v1/erasures").json()["erasures"]
        assert done["completed_at"] is not None and done["status"] == "completed"
    # Of what happened before the erasure only its fact and time remain.
    assert [e["action"] for e in log if e["action"] == "erase"] == ["erase"]
    assert all(e["at"] >= done["requested_at"] for e in log)


def _finished(api: httpx.Client, erasure_id: str, timeout: float = 60.0) -> dict:
    """The erasure once its job completed (a job starts within a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        erasure = api.get(f"/v1/erasures/{erasure_id}").json()["erasure"]
        if erasure["status"] == "completed":
            return erasure
        time.sleep(0.2)
    raise AssertionError(f"erasure {erasure_id} still pending after {timeout:.0f} s")


def _late_copy(served, vin: str) -> dict:
    """An old stretch of the vehicle's data, sent again late under a new upload id."""
    value = served["published"].first_uploads[vin][1]
    from schemas import default_store

    record, _ = default_store().decode(value)
    return {**record, "upload_id": str(uuid.uuid4())}


def _fresh_upload(vin: str) -> dict:
    """After the erasure: a minute of driving, then three parked (a trip that begins and
    ends after the erasure, stamped up to four minutes ahead: within the allowed skew)."""
    now = int(datetime.now(UTC).timestamp() * 1000)
    start = now + 5_000
    samples = []
    for i in range(24):  # a sample every 10 s
        driving = i < 6
        samples.append(
            {
                "event_time_ms": start + i * 10_000,
                "seq": 10_000_000 + i,
                "speed": 36.0 if driving else 0.0,
                "latitude": 48.1,
                "longitude": 11.6,
                "heading": 0.0,
                "odometer": 20_000.0 + 0.1 * min(i, 6),
                "soc": 60.0 - 0.01 * min(i, 6),
                "is_charging": False,
                "charge_power": None,
                "charge_mode": None,
                "battery_temperature": 20.0,
                "outside_temperature": 8.0,
                "gear": "DRIVE" if driving else "PARK",
                "dtcs": [],
            }
        )
    return {
        "vin": vin,
        "upload_id": str(uuid.uuid4()),
        "sent_at_ms": samples[-1]["event_time_ms"],
        "gateway_firmware": "3.2.1",
        "samples": samples,
    }


def test_the_service_serves_its_openapi_document(served):
    doc = httpx.get(f"{served['urls']['eu']}/openapi.json").json()
    paths = set(doc["paths"])
    assert {
        "/v1/me",
        "/v1/vehicles",
        "/v1/vehicles/{vin}/samples",
        "/v1/trips",
        "/v1/charges",
        "/v1/daily-summaries",
        "/v1/grants",
        "/v1/grants/{grant_id}",
        "/v1/export",
        "/v1/erasure",
        "/v1/erasures",
        "/v1/audit",
    } <= paths


# -- schema-driven fuzzing --------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_url(f"{served['urls']['eu']}/openapi.json")


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.exclude(method="POST", path="/v1/erasure").parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)  # same cases every run: CI stays stable
def test_fuzzing_the_openapi_document_finds_no_500_and_no_other_owners_data(case, served):
    owner, _ = _owner_in(served, "eu", 0)
    others = [v for v in served["fleet"] if v.owner_id != owner]
    response = case.call(headers={"Authorization": f"Bearer {_owner_token(owner, 'eu')}"})
    assert response.status_code < 500, response.text
    body = response.content
    if response.headers.get("content-type") == "application/zip":
        archive = zipfile.ZipFile(io.BytesIO(body))
        body = b"".join(archive.read(name) for name in archive.namelist())
    text = body.decode(errors="replace")
    leaked = [v.vin for v in others if v.vin in text] + [
        v.owner_id for v in others if f'"{v.owner_id}"' in text
    ]
    assert not leaked, (case.method, case.formatted_path, leaked)


# -- scopes, errors, odd tokens -----------------------------------------------------------

BASE_TRIP = {"vin", "start_time", "end_time", "duration_s"}
BASE_CHARGE = {"vin", "start_time", "end_time", "duration_s"}
BASE_DAY = {"vin", "date", "time_zone", "final", "samples"}
# Written out by hand, not derived from owner_api.scopes: what each grant may see.
COLUMNS_BY_SCOPES = {
    ("driving",): {
        "trips": BASE_TRIP
        | {"distance_km", "avg_speed_kmh", "max_speed_kmh", "start_odometer", "end_odometer"},
        "charges": None,  # 403 missing_scope
        "daily_summaries": BASE_DAY | {"distance_km", "driving_s", "parked_s", "trips"},
        "samples": {"event_time", "seq", "speed", "odometer", "gear"},
    },
    ("driving", "location"): {
        "trips": BASE_TRIP
        | {
            "distance_km",
            "avg_speed_kmh",
            "max_speed_kmh",
            "start_odometer",
            "end_odometer",
            "start_lat",
            "start_lon",
            "end_lat",
            "end_lon",
        },
        "charges": None,
        "daily_summaries": BASE_DAY | {"distance_km", "driving_s", "parked_s", "trips"},
        "samples": {
            "event_time",
            "seq",
            "speed",
            "odometer",
            "gear",
            "latitude",
            "longitude",
            "heading",
        },
    },
    ("battery",): {
        "trips": None,
        "charges": BASE_CHARGE
        | {
            "start_soc",
            "end_soc",
            "energy_added_kwh",
            "energy_metered_kwh",
            "peak_power_kw",
            "avg_power_kw",
            "mode",
        },
        "daily_summaries": None,
        "samples": {
            "event_time",
            "seq",
            "soc",
            "is_charging",
            "charge_power",
            "charge_mode",
            "battery_temperature",
        },
    },
    ("battery", "location"): {
        "trips": None,
        "charges": BASE_CHARGE
        | {
            "start_soc",
            "end_soc",
            "energy_added_kwh",
            "energy_metered_kwh",
            "peak_power_kw",
            "avg_power_kw",
            "mode",
            "lat",
            "lon",
        },
        "daily_summaries": None,
        "samples": {
            "event_time",
            "seq",
            "soc",
            "is_charging",
            "charge_power",
            "charge_mode",
            "battery_temperature",
            "latitude",
            "longitude",
            "heading",
        },
    },
    ("battery", "driving"): {
        "trips": BASE_TRIP
        | {
            "distance_km",
            "avg_speed_kmh",
            "max_speed_kmh",
            "start_odometer",
            "end_odometer",
            "start_soc",
            "end_soc",
            "soc_used",
            "energy_kwh",
        },
        "charges": BASE_CHARGE
        | {
            "start_soc",
            "end_soc",
            "energy_added_kwh",
            "energy_metered_kwh",
            "peak_power_kw",
            "avg_power_kw",
            "mode",
        },
        "daily_summaries": BASE_DAY
        | {
            "distance_km",
            "driving_s",
            "parked_s",
            "trips",
            "energy_used_kwh",
            "energy_charged_kwh",
            "idle_drain_kwh",
            "efficiency_wh_per_km",
            "charges",
        },
        "samples": {
            "event_time",
            "seq",
            "speed",
            "odometer",
            "gear",
            "soc",
            "is_charging",
            "charge_power",
            "charge_mode",
            "battery_temperature",
        },
    },
    ("climate", "driving"): {
        "trips": BASE_TRIP
        | {
            "distance_km",
            "avg_speed_kmh",
            "max_speed_kmh",
            "start_odometer",
            "end_odometer",
            "outside_temp_avg",
        },
        "charges": None,
        "daily_summaries": BASE_DAY | {"distance_km", "driving_s", "parked_s", "trips"},
        "samples": {
            "event_time",
            "seq",
            "speed",
            "odometer",
            "gear",
            "outside_temperature",
            "cabin_temperature",
        },
    },
    ("diagnostics",): {
        "trips": None,
        "charges": None,
        "daily_summaries": None,
        "samples": {"event_time", "seq", "dtcs"},
    },
}


def _columns_seen(api: httpx.Client, vin: str) -> dict[str, set[str] | None]:
    window = {"start": "2026-01-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
    seen: dict[str, set[str] | None] = {}
    for route, key in (
        ("trips", "trips"),
        ("charges", "charges"),
        ("daily-summaries", "daily_summaries"),
    ):
        r = api.get(f"/v1/{route}", params=window)
        if r.status_code == 403:
            assert r.json()["error"] == "missing_scope"
            seen[key] = None
        else:
            found = r.json()[key]
            assert found, f"no {route} to look at"
            seen[key] = set().union(*(set(row) for row in found))
    samples = api.get(f"/v1/vehicles/{vin}/samples", params={**window, "limit": 5}).json()
    seen["samples"] = set().union(*(set(s) for s in samples["samples"]))
    return seen


def test_each_scope_opens_exactly_its_columns_on_every_route(served):
    owner, vins = next(
        (o, vins)
        for o, vins in (_owner_in(served, "eu", i) for i in range(6))
        if sum(len(_closed_charges(served, v)) for v in vins)
        and sum(len(_closed_trips(served, v)) for v in vins)
    )
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        everything = _columns_seen(api, vins[0])
        grants = {
            scopes: api.post(
                "/v1/grants",
                json={
                    "party": f"p-{'-'.join(scopes)}",
                    "scopes": list(scopes),
                    "expires_in_s": 600,
                },
            ).json()["token"]
            for scopes in COLUMNS_BY_SCOPES
        }
    for scopes, expected in COLUMNS_BY_SCOPES.items():
        with _client(served, "eu", grants[scopes]) as party:
            assert _columns_seen(party, vins[0]) == expected, scopes
    # the owner sees the union of every scope's columns, and nothing beyond
    for route in ("trips", "charges", "daily_summaries", "samples"):
        union = set().union(*(e[route] or set() for e in COLUMNS_BY_SCOPES.values()))
        assert everything[route] == union, route


def test_every_error_answer_has_the_documented_shape(served):
    owner, _vins = _owner_in(served, "eu")
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        for method, path, body, status, code in [
            ("GET", "/v1/nothing-here", None, 404, "not_found"),
            ("DELETE", "/v1/me", None, 405, "method_not_allowed"),
            ("PUT", "/v1/export", None, 405, "method_not_allowed"),
            ("POST", "/v1/grants", b"{not json", 400, "bad_parameter"),
            ("POST", "/v1/grants", b'{"party": "x"}', 400, "bad_parameter"),
        ]:
            r = api.request(
                method, path, content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == status, (method, path, r.text)
            assert set(r.json()) == {"error", "message"} and r.json()["error"] == code, r.text


def test_a_refused_read_never_names_another_owners_vehicle_in_the_log(served):
    owner, _ = _owner_in(served, "eu", 1)
    _, theirs = _owner_in(served, "eu", 2)
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        for params in (
            {"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
            {"cursor": "nonsense"},
            {"signals": "warp"},
            {},
        ):
            assert api.get(f"/v1/vehicles/{theirs[0]}/samples", params=params).status_code >= 400
        assert api.get("/v1/trips", params={"vin": theirs[0]}).status_code == 404
        log = api.get("/v1/audit").json()["entries"]
    assert theirs[0] not in json.dumps(log)
    assert sum(e["action"] == "denied" for e in log) >= 5


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 10**30},
        {"exp": 4.1e9},  # a float, and longer than any owner token may live
        {"sub": ["owner-0001"]},
        {"scopes": [["driving"]], "kind": "grant", "grant": "0" * 32, "party": "p"},
        {"iat": "yesterday"},
        {"admin": True},
    ],
)
def test_a_validly_signed_token_with_odd_claims_gets_401_never_500(served, claims):
    import jwt

    kind = claims.get("kind", "owner")
    kid, secret = RING["eu"].signing(kind)
    now = int(time.time())
    payload = {
        "iss": "vtp",
        "aud": audience("eu"),
        "sub": "owner-0001",
        "kind": kind,
        "iat": now,
        "exp": now + 60,
        **claims,
    }
    token = jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid})
    with _client(served, "eu", token) as api:
        r = api.get("/v1/me")
    assert (r.status_code, r.json()["error"]) == (401, "malformed_token"), r.text


def test_analysts_over_http_get_the_same_allow_list_and_no_secret_anywhere_they_can_reach(served):
    from tests.integration.test_analyst import attacks

    settings = served["settings"]
    token = issue(RING["eu"], analyst_claims("probe", "eu", 60))
    with _client(served, "eu", token) as api:
        for sql in attacks(settings):
            r = api.post("/v1/analyst/sql", json={"sql": sql})
            assert (r.status_code, r.json()["error"]) == (400, "query_refused"), (sql, r.text)
        ok = api.post("/v1/analyst/sql", json={"sql": "SELECT count() AS n FROM analyst_trips"})
        assert ok.status_code == 200 and ok.json()["rows"][0][0] > 0
    secrets = [s for ring in RING["eu"].keys.values() for s in ring.values()]
    secrets.append((settings.keys_path / "pseudonym.key").read_text().strip())
    serve = served["processes"][1]
    environ = Path(f"/proc/{serve.popen.pid}/environ")
    environment = environ.read_bytes().decode(errors="replace")
    assert not [s for s in secrets if s in environment]  # nothing for file('/proc/self/environ')
    assert settings.keys_path.resolve() not in settings.warehouse_path.resolve().parents


def test_a_runaway_analyst_query_is_cancelled_while_owners_are_served(served):
    import threading

    owner, vins = _owner_in(served, "eu")
    analyst = issue(RING["eu"], analyst_claims("heavy", "eu", 60))
    answer: dict = {}

    def runaway() -> None:
        with _client(served, "eu", analyst) as api:
            answer["response"] = api.post(
                "/v1/analyst/sql",
                json={
                    "sql": "SELECT sum(length(a.vehicle_ref) * length(b.owner_ref)) FROM analyst_samples AS a, analyst_samples AS b"
                },
            )

    thread = threading.Thread(target=runaway)
    thread.start()
    answered = []  # (status, was the analyst's query still running when it was answered)
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        while thread.is_alive():
            r = api.get(f"/v1/vehicles/{vins[0]}/samples", params={"limit": 10})
            answered.append((r.status_code, thread.is_alive()))
            time.sleep(0.1)
    thread.join()
    r = answer["response"]
    assert (r.status_code, r.json()["error"]) == (400, "query_cancelled"), r.text
    # owners were answered while it ran, not queued behind it
    assert all(code == 200 for code, _ in answered)
    assert sum(running for _, running in answered) >= 3, answered


def test_analyst_queries_run_two_at_a_time_and_bodies_and_odd_tokens_are_refused_early(served):
    import threading

    import jwt

    analyst = issue(RING["eu"], analyst_claims("busy", "eu", 60))
    heavy = "SELECT sum(length(a.vehicle_ref) * length(b.owner_ref)) FROM analyst_samples AS a, analyst_samples AS b"
    answers: list = []

    def run() -> None:
        with _client(served, "eu", analyst) as api:
            answers.append(api.post("/v1/analyst/sql", json={"sql": heavy}))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    with _client(served, "eu", analyst) as api:
        third = api.post("/v1/analyst/sql", json={"sql": "SELECT 1"})
    for t in threads:
        t.join()
    assert (third.status_code, third.json()["error"]) == (429, "too_many_queries"), third.text
    assert [a.json()["error"] for a in answers] == ["query_cancelled"] * 2
    with _client(served, "eu", analyst) as api:
        assert api.post("/v1/analyst/sql", json={"sql": "SELECT 1 AS one"}).json()["rows"] == [[1]]
        # a body bigger than any route takes: 413 before it is read, token or not
        r = api.post(
            "/v1/analyst/sql",
            content=b"x" * (2 << 20),
            headers={"content-type": "application/json"},
        )
        assert (r.status_code, r.json()["error"]) == (413, "too_large")
    with _client(served, "eu", None) as anonymous:
        r = anonymous.post("/v1/analyst/sql", content=b"x" * (2 << 20))
        assert (r.status_code, r.json()["error"]) == (413, "too_large")
    owner, vins = _owner_in(served, "eu")
    kid, secret = RING["eu"].signing("owner")
    now = int(time.time())
    two_audiences = jwt.encode(
        {
            "iss": "vtp",
            "aud": [audience("eu"), audience("cn")],
            "sub": owner,
            "kind": "owner",
            "iat": now,
            "exp": now + 60,
        },
        secret,
        algorithm="HS256",
        headers={"kid": kid},
    )
    with _client(served, "eu", two_audiences) as api:
        assert api.get("/v1/me").json()["error"] == "malformed_token"
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        r = api.get(f"/v1/vehicles/{vins[0]}/samples", params={"cursor": f"1.{2**64}"})
        assert (r.status_code, r.json()["error"]) == (400, "bad_cursor")


def test_a_key_rotated_or_retired_takes_effect_in_the_running_service(served):
    from vtp.core.keys import add_key, load_keyring, retire_key

    settings = served["settings"]
    owner, _ = _owner_in(served, "eu")
    kid = add_key(settings, "owner")  # what `vtp keys rotate` does, next to the service
    fresh = issue(load_keyring(settings, create=False), owner_claims(owner, "eu", 600))
    with _client(served, "eu", fresh) as api:
        assert api.get("/v1/me").status_code == 200  # signed with a key it had not seen
    assert retire_key(settings, kid)
    with _client(served, "eu", fresh) as api:
        assert api.get("/v1/me").json()["error"] == "forged_token"
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        assert api.get("/v1/me").status_code == 200  # the older key still signs and verifies


def test_daily_summaries_are_chosen_by_the_local_days_the_caller_names(served):
    owner, _vins = _owner_in(served, "eu")
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        everything = api.get(
            "/v1/daily-summaries",
            params={"start": "2026-11-01T00:00:00Z", "end": "2026-11-30T00:00:00Z"},
        ).json()["daily_summaries"]
        dates = sorted({d["date"] for d in everything})
        assert dates, "no days to look at"
        first = dates[0]
        # the first local day, named with the vehicles' own offset (CET): in UTC its
        # midnight falls on the day before, and a window cut on UTC dates would miss it
        one_day = api.get(
            "/v1/daily-summaries",
            params={"start": f"{first}T00:00:00+01:00", "end": f"{first}T23:59:59+01:00"},
        ).json()
        assert {d["date"] for d in one_day["daily_summaries"]} == {first}
        before = api.get(
            "/v1/daily-summaries",
            params={"start": "2026-10-01T00:00:00+01:00", "end": f"{first}T00:00:00+01:00"},
        ).json()
        assert before["daily_summaries"] == []  # the end is excluded


def test_an_export_left_half_way_is_in_the_access_log_with_what_was_sent(served):
    owner, _ = _owner_in(served, "eu", 1)
    with _client(served, "eu", _owner_token(owner, "eu")) as api:
        with api.stream("GET", "/v1/export", params={"format": "jsonl"}) as r:
            assert r.status_code == 200
            next(r.iter_bytes())  # the first bytes, then the client goes away
        deadline, partial = time.monotonic() + 30, []
        while not partial and time.monotonic() < deadline:
            entries = api.get("/v1/audit").json()["entries"]
            partial = [e for e in entries if e["action"] == "export" and e["status"] == 499]
            time.sleep(0.2)
    assert partial, "the half-sent export left no trace"
    assert "incomplete (the client went away before the end)" in partial[0]["detail"]
    assert partial[0]["rows"] > 0

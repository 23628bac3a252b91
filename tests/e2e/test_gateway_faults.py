"""The vehicle edge under faults, on real processes: a vehicle offline for ten minutes of
driving, the gateway SIGKILLed mid-stream, the broker stopped for a minute, a vehicle
over its rate, a client trying to exhaust the gateway's memory. What the vehicles sent
ends in Kafka and the warehouse once, in each vehicle's order."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.broker import start_broker, stop_broker
from producers.gateway import CONNECTION_SLACK, HANDSHAKES_AT_ONCE
from producers.pki import init_region, issue_vehicle
from producers.publish import DEFAULT_START_MS, register_fleet
from producers.simulator import build_fleet, new_truth, simulate
from producers.uplink import VehicleCredentials, VehicleUplink
from tests.e2e.test_gateway import eventually
from tests.e2e.test_pipeline import free_port, scrape
from vtp.core.settings import load_settings
from vtp.core.topics import create_topics
from vtp.core.warehouse import open_warehouse, rows
from vtp.harness import (
    start_gateway,
    start_sink,
    start_worker,
    vehicle_upload_ids,
    wait_drained,
)

pytestmark = pytest.mark.e2e


def drives(fleet, seed: int, minutes: float) -> dict[str, list[dict]]:
    """Each vehicle's simulated uploads, in its order."""
    by_vin: dict[str, list[dict]] = {v.vin: [] for v in fleet}
    for upload in simulate(
        fleet, seed=seed, start_ms=DEFAULT_START_MS, duration_s=minutes * 60, truth=new_truth(fleet)
    ):
        by_vin[upload["vin"]].append(upload)
    return by_vin


def credentials(settings, vin: str) -> VehicleCredentials:
    identity = issue_vehicle(settings.pki_path, vin)
    return VehicleCredentials(
        identity.cert_path, identity.key_path, settings.pki_path / "edge-ca.pem"
    )


def stored(settings, vins: list[str]) -> dict[str, list[str]]:
    """Each vehicle's upload ids in the warehouse, every copy (opened after the sink stops)."""
    warehouse = open_warehouse(settings)
    try:
        found = rows(
            warehouse.query(
                "SELECT vin, upload_id FROM uploads WHERE vin IN {vins:Array(String)}",
                {"vins": vins},
            )
        )
    finally:
        warehouse.close()
    by_vin: dict[str, list[str]] = {v: [] for v in vins}
    for vin, upload_id in found:
        by_vin[vin].append(upload_id)
    return by_vin


def first_copies(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


class Edge:
    """A region with its worker and sink, and a gateway on a port that stays the same
    across restarts (so the vehicles' uplinks find it again by themselves)."""

    def __init__(self, settings):
        self.settings = settings
        self.processes = [start_worker(settings), start_sink(settings)]
        self.gateway, self.url = start_gateway(settings)

    def restart_gateway(self) -> None:
        self.gateway, url = start_gateway(self.settings)
        assert url == self.url

    def stop(self) -> None:
        for p in [self.gateway, *self.processes]:
            p.stop()


@pytest.fixture
def edge_region(region_stack):
    def make(name: str, **overrides) -> tuple[Edge, list]:
        settings = region_stack(
            "eu",
            name,
            gateway_port=free_port(),
            gateway_rate=1000.0,  # an hour of uploads in seconds: no rate limit here
            gateway_burst=1000,
            sink_flush_ms=300,
            **overrides,
        )
        init_region(settings.pki_path, "eu")
        fleet = build_fleet(83, owners=2, vehicles=3, regions=("eu",))
        register_fleet(settings, fleet)
        edge = Edge(settings)
        started.append(edge)
        return edge, fleet

    started: list[Edge] = []
    yield make
    for edge in started:
        edge.stop()


def test_a_vehicle_offline_for_ten_minutes_catches_up_in_order_once(edge_region, tmp_path):
    edge, fleet = edge_region("offline")
    vehicle = fleet[0]
    uploads = drives([vehicle], seed=5, minutes=25)[vehicle.vin]
    before = [u for u in uploads if u["sent_at_ms"] < DEFAULT_START_MS + 5 * 60_000]
    offline = [
        u for u in uploads if u not in before and u["sent_at_ms"] < DEFAULT_START_MS + 15 * 60_000
    ]
    after = [u for u in uploads if u not in before and u not in offline]
    assert before and len(offline) >= 30 and after  # ten minutes of driving: 10 s uploads
    uplink = VehicleUplink(edge.url, credentials(edge.settings, vehicle.vin), tmp_path / "spool")
    try:
        for upload in before:
            uplink.send(upload)
        assert uplink.wait_acknowledged(60), uplink.report
        edge.gateway.stop()  # the garage: nothing answers for ten minutes of driving
        for upload in offline:
            uplink.send(upload)
        assert uplink.pending() == len(offline)  # kept on the vehicle, on disk
        edge.restart_gateway()
        for upload in after:
            uplink.send(upload)
        assert uplink.wait_acknowledged(120), uplink.report
    finally:
        report = uplink.close()
    assert report.acknowledged == len(uploads) and not report.refused
    sent = [u["upload_id"] for u in uploads]
    assert vehicle_upload_ids(edge.settings, vehicle.vin) == sent  # in Kafka once each, in order
    assert wait_drained(edge.settings, [edge.gateway, *edge.processes], timeout=240)
    edge.stop()
    assert sorted(stored(edge.settings, [vehicle.vin])[vehicle.vin]) == sorted(sent)


def _stream(uplink: VehicleUplink, uploads: list[dict], pace_s: float) -> None:
    for upload in uploads:
        uplink.send(upload)
        time.sleep(pace_s)


def test_a_gateway_killed_mid_stream_loses_nothing_and_stores_nothing_twice(edge_region, tmp_path):
    edge, fleet = edge_region("edgekill")
    routes = drives(fleet, seed=6, minutes=40)
    uplinks = {
        v.vin: VehicleUplink(edge.url, credentials(edge.settings, v.vin), tmp_path / v.vin)
        for v in fleet
    }
    senders = [
        threading.Thread(target=_stream, args=(uplinks[vin], uploads, 0.01))
        for vin, uploads in routes.items()
    ]
    try:
        for t in senders:
            t.start()
        assert eventually(lambda: sum(u.report.acknowledged for u in uplinks.values()) > 100, 60)
        edge.gateway.kill()  # SIGKILL: whatever Kafka had not acknowledged was never answered
        time.sleep(1.0)
        edge.restart_gateway()
        for t in senders:
            t.join()
        for vin, uplink in uplinks.items():
            assert uplink.wait_acknowledged(120), (vin, uplink.report)
    finally:
        reports = {vin: u.close() for vin, u in uplinks.items()}
    assert all(r.connects >= 2 and not r.refused for r in reports.values()), reports
    in_kafka = {vin: vehicle_upload_ids(edge.settings, vin) for vin in routes}
    for vin, uploads in routes.items():
        sent = [u["upload_id"] for u in uploads]
        # a resend of what Kafka took just before the kill may be there twice, after it
        assert first_copies(in_kafka[vin]) == sent, vin
    assert wait_drained(edge.settings, [edge.gateway, *edge.processes], timeout=240)
    edge.stop()
    found = stored(edge.settings, list(routes))
    for vin, uploads in routes.items():
        assert sorted(found[vin]) == sorted(u["upload_id"] for u in uploads), vin


def test_a_broker_stopped_for_a_minute_pushes_back_and_loses_nothing(tmp_path):
    base = load_settings({}).with_(
        data_dir=tmp_path / "data",
        region="eu",
        # a budget below one vehicle's window (32 uploads), so the gateway's pushback shows
        gateway_inflight_mb=0.01,
        gateway_rate=1000.0,
        gateway_burst=1000,
    )
    state = start_broker(base)
    settings = base.with_(kafka_bootstrap=state.bootstrap, broker_port=state.port)
    gateway = None
    uplink = None
    try:
        create_topics(settings)
        init_region(settings.pki_path, "eu")
        fleet = build_fleet(85, owners=1, vehicles=1, regions=("eu",))
        uploads = drives(fleet, seed=7, minutes=60)[fleet[0].vin]
        metrics_port = free_port()
        gateway, url = start_gateway(settings, metrics_port=metrics_port)
        uplink = VehicleUplink(url, credentials(settings, fleet[0].vin), tmp_path / "spool")
        half = len(uploads) // 2
        for upload in uploads[:half]:
            uplink.send(upload)
        assert uplink.wait_acknowledged(60), uplink.report
        assert stop_broker(settings)
        stopped = time.monotonic()
        for upload in uploads[half:]:
            uplink.send(upload)
        backpressure = 'vtp_gateway_backpressure{region="eu"}'
        assert eventually(lambda: scrape(metrics_port).get(backpressure) == 1, 30)
        assert uplink.report.retried.get("kafka_backlog", 0) > 0  # the vehicle was told
        assert uplink.pending() > 0  # and keeps the rest on its disk
        inflight = scrape(metrics_port)['vtp_gateway_inflight_bytes{region="eu"}']
        assert inflight <= 0.01 * 2**20  # the budget holds
        time.sleep(max(0.0, 60 - (time.monotonic() - stopped)))
        again = start_broker(settings)
        assert again.port == state.port
        assert uplink.wait_acknowledged(180), uplink.report
        assert scrape(metrics_port).get(backpressure) == 0
        assert gateway.exited() is None
    finally:
        if uplink is not None:
            uplink.close()
        if gateway is not None:
            gateway.stop()
    assert vehicle_upload_ids(settings, fleet[0].vin) == [u["upload_id"] for u in uploads]
    stop_broker(settings)


def test_a_vehicle_over_its_rate_is_told_to_slow_down_and_keeps_its_order(region_stack, tmp_path):
    settings = region_stack("eu", "edgerate", gateway_rate=20.0, gateway_burst=5)
    init_region(settings.pki_path, "eu")
    metrics_port = free_port()
    gateway, url = start_gateway(settings, metrics_port=metrics_port)
    vin = "WVWZZZ1JZXW0000R1"
    uplink = VehicleUplink(url, credentials(settings, vin), tmp_path / "spool")
    try:
        for n in range(40):
            uplink.send(
                {
                    "vin": vin,
                    "upload_id": f"r-{n:03d}",
                    "sent_at_ms": DEFAULT_START_MS + n * 1000,
                    "gateway_firmware": "t",
                    "samples": [{"event_time_ms": DEFAULT_START_MS + n * 1000, "seq": n}],
                }
            )
        assert uplink.wait_acknowledged(60), uplink.report
        limited = scrape(metrics_port)
    finally:
        report = uplink.close()
        gateway.stop()
    assert report.retried.get("rate_limited", 0) > 0 and report.acknowledged == 40
    assert vehicle_upload_ids(settings, vin) == [f"r-{n:03d}" for n in range(40)]
    assert limited['vtp_gateway_uploads_retried_total{reason="rate_limited",region="eu"}'] > 0


def _connect_quietly(host: str, port: int) -> socket.socket:
    """A TCP connection begun and left alone (past the listen backlog it stays a SYN)."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex((host, port))
    return sock


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_many_connections_and_oversize_bodies_cannot_exhaust_the_gateway(region_stack, tmp_path):
    settings = region_stack("eu", "edgeflood", gateway_max_connections=100)
    init_region(settings.pki_path, "eu")
    metrics_port = free_port()
    gateway, url = start_gateway(settings, metrics_port=metrics_port)
    host, port = url.removeprefix("wss://").split("/")[0].rsplit(":", 1)
    vehicles = [credentials(settings, f"WVWZZZ1JZXW{n:06d}") for n in range(120)]
    pid = gateway.popen.pid
    try:
        baseline = _rss_kb(pid)
        # 2000 connections that never begin a handshake: the gateway takes as many as it
        # has handshake slots, the rest wait in the kernel's backlog
        idle = [_connect_quietly(host, int(port)) for _ in range(2000)]
        try:
            accepted = 'vtp_gateway_tcp_accepted_total{region="eu"}'
            room = min(HANDSHAKES_AT_ONCE, 100 + CONNECTION_SLACK)
            assert eventually(lambda: scrape(metrics_port).get(accepted) == room, 30)
            time.sleep(1.0)
            assert scrape(metrics_port)[accepted] == room
            idle_kb = _rss_kb(pid) - baseline
        finally:
            for s in idle:
                s.close()
        assert idle_kb < 100_000, idle_kb  # a small read buffer each, not asyncio's 256 KiB
        refused = 'vtp_gateway_handshakes_refused_total{region="eu"}'

        def every_accepted_one_refused() -> bool:
            now = scrape(metrics_port)
            return now.get(refused) == now[accepted]

        assert eventually(every_accepted_one_refused, 60)
        flood = asyncio.run(
            _flood(host, int(port), vehicles, settings.max_upload_bytes, lambda: _rss_kb(pid))
        )
        assert flood.refused_503 == 20, flood  # 100 streams at most: the rest wait
        assert flood.ended == 100, flood
        oversize = 'vtp_gateway_oversize_frames_total{region="eu"}'
        # each claim of 64 MiB ended its stream (counted once the close handshake ends)
        assert eventually(lambda: scrape(metrics_port).get(oversize) == 100, 30)
        # 100 streams each holding 90 % of a legal frame, then 100 claims of 64 MiB with
        # 8 MiB sent: bounded by streams x the upload limit
        grew_kb = max(flood.rss_kb) - baseline
        assert grew_kb < 100 * settings.max_upload_bytes // 1024 + 150_000, (baseline, flood)
        uplink = VehicleUplink(url, vehicles[0], tmp_path / "spool")
        try:  # and a vehicle is served again once they have gone
            uplink.send(
                {
                    "vin": "WVWZZZ1JZXW000000",
                    "upload_id": "after-flood",
                    "sent_at_ms": DEFAULT_START_MS,
                    "gateway_firmware": "t",
                    "samples": [],
                }
            )
            assert uplink.wait_acknowledged(60), uplink.report
        finally:
            uplink.close()
        assert gateway.exited() is None
    finally:
        gateway.stop()


@dataclass
class Flood:
    refused_503: int = 0
    ended: int = 0  # streams the gateway ended while they sent
    rss_kb: list[int] = field(default_factory=list)


def _frame_header(length: int) -> bytes:
    """A masked binary frame of ``length`` bytes (mask 0: the payload goes as it is)."""
    return b"\x82\xff" + length.to_bytes(8, "big") + b"\x00\x00\x00\x00"


async def _flood(host: str, port: int, vehicles, limit: int, rss) -> Flood:
    """Every vehicle opens a stream at once and sends 90 % of a legal frame; while all
    hold theirs, the gateway's memory is read; then each claims a 64 MiB frame and tries
    to send 8 MiB of it."""
    flood = Flood()
    hold = asyncio.Event()
    upgrade = (
        f"GET /v1/uploads HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()

    async def one(creds: VehicleCredentials) -> None:
        reader, writer = await asyncio.open_connection(host, port, ssl=creds.context())
        try:
            writer.write(upgrade)
            status = await reader.readline()
            if b" 503 " in status:
                flood.refused_503 += 1
                return
            await reader.readuntil(b"\r\n\r\n")
            writer.write(_frame_header(limit - 1) + b"\x00" * (limit * 9 // 10))
            await writer.drain()
            await hold.wait()
            writer.write(b"\x00" * (limit - 1 - limit * 9 // 10) + _frame_header(64 << 20))
            try:
                for _ in range(128):
                    writer.write(b"\x00" * 65536)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            answer = b""
            try:
                while chunk := await reader.read(65536):
                    answer += chunk
            except (ConnectionError, ssl.SSLError):
                pass
            flood.ended += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    tasks = [asyncio.create_task(one(c)) for c in vehicles]
    for _ in range(50):  # every stream holds its partial frame within a few seconds
        await asyncio.sleep(0.1)
        flood.rss_kb.append(rss())
    hold.set()
    await asyncio.gather(*tasks)
    flood.rss_kb.append(rss())
    await asyncio.sleep(0.25)
    return flood

"""The vehicle edge as vehicles meet it: `vtp gateway` processes on a real broker, the
vehicle SDK's store-and-forward uplink, certificates from the region's development PKI
(and from elsewhere)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import pytest

from producers import edge_wire
from producers.pki import forge_vehicle, init_region, issue_vehicle, revoke
from producers.uplink import VehicleCredentials, VehicleUplink
from tests.e2e.test_pipeline import free_port, scrape
from vtp.harness import start_gateway, vehicle_upload_ids

pytestmark = pytest.mark.e2e

VIN_A = "WVWZZZ1JZXW0000A1"
VIN_B = "WVWZZZ1JZXW0000B2"


def credentials(settings, vin: str) -> VehicleCredentials:
    identity = issue_vehicle(settings.pki_path, vin)
    return VehicleCredentials(
        identity.cert_path, identity.key_path, settings.pki_path / "edge-ca.pem"
    )


def upload(vin: str, n: int, samples: int = 3, start_ms: int = 1_793_944_800_000) -> dict:
    return {
        "vin": vin,
        "upload_id": f"{vin}-{n:05d}",
        "sent_at_ms": start_ms + n * 10_000 + 9_000,
        "gateway_firmware": "test",
        "samples": [
            {"event_time_ms": start_ms + n * 10_000 + i * 1000, "seq": n * 100 + i, "speed": 20.0}
            for i in range(samples)
        ],
    }


def eventually(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module")
def edge(region_stack):
    """An EU region's topics and PKI, and its gateway (reloading the deny-list often)."""
    settings = region_stack("eu", "edge", gateway_revoked_reload_s=0.3)
    init_region(settings.pki_path, "eu")
    port = free_port()
    process, url = start_gateway(settings, metrics_port=port)
    yield settings, url, port
    process.stop()


def test_an_upload_is_acknowledged_once_kafka_has_it_keyed_by_the_vehicle(edge, tmp_path):
    settings, url, metrics_port = edge
    uplink = VehicleUplink(url, credentials(settings, VIN_A), tmp_path / "spool")
    try:
        for n in range(20):
            uplink.send(upload(VIN_A, n))
        assert uplink.wait_acknowledged(30), uplink.report
    finally:
        report = uplink.close()
    assert report.acknowledged == 20 and not report.refused
    assert vehicle_upload_ids(settings, VIN_A)[-20:] == [f"{VIN_A}-{n:05d}" for n in range(20)]
    assert scrape(metrics_port)['vtp_gateway_uploads_accepted_total{region="eu"}'] >= 20


def _refused_handshake(url: str, creds: VehicleCredentials, tmp_path: Path) -> str:
    uplink = VehicleUplink(url, creds, tmp_path)
    try:
        uplink.send(upload(creds_vin(creds), 0))
        assert not uplink.wait_acknowledged(3)
    finally:
        report = uplink.close()
    assert report.connects == 0 and report.connect_failures > 0
    return report.last_error


def creds_vin(creds: VehicleCredentials) -> str:
    return creds.cert.stem.removeprefix("forged-")


def test_a_certificate_from_a_forged_ca_is_refused_in_the_handshake(edge, tmp_path):
    settings, url, _ = edge
    forged = forge_vehicle(tmp_path / "forged", VIN_B, "eu")
    creds = VehicleCredentials(forged.cert_path, forged.key_path, settings.pki_path / "edge-ca.pem")
    before = vehicle_upload_ids(settings, VIN_B)
    # TLS 1.3: the client's side of the handshake ends before the server judges its
    # certificate, so the refusal reaches it as an alert or a reset, never a stream
    assert _refused_handshake(url, creds, tmp_path / "spool")
    assert vehicle_upload_ids(settings, VIN_B) == before


def test_a_certificate_from_another_regions_vehicle_ca_is_refused(edge, tmp_path):
    settings, url, _ = edge
    china = tmp_path / "cn-pki"
    init_region(china, "cn")
    identity = issue_vehicle(china, VIN_B)
    # it trusts the EU edge CA, so only its own certificate can fail the handshake
    creds = VehicleCredentials(
        identity.cert_path, identity.key_path, settings.pki_path / "edge-ca.pem"
    )
    before = vehicle_upload_ids(settings, VIN_B)
    _refused_handshake(url, creds, tmp_path / "spool")
    assert vehicle_upload_ids(settings, VIN_B) == before


def test_a_vehicle_cannot_upload_for_another_vin(edge, tmp_path):
    settings, url, _ = edge
    uplink = VehicleUplink(url, credentials(settings, VIN_A), tmp_path / "spool")
    before = vehicle_upload_ids(settings, VIN_B)
    try:
        uplink.send(upload(VIN_B, 0))
        uplink.send(upload(VIN_A, 900))
        assert uplink.wait_acknowledged(30), uplink.report
    finally:
        report = uplink.close()
    assert [(i, r) for i, r, _ in report.refused] == [(f"{VIN_B}-00000", "vin_mismatch")]
    assert report.acknowledged == 1
    assert vehicle_upload_ids(settings, VIN_B) == before
    assert f"{VIN_A}-00900" in vehicle_upload_ids(settings, VIN_A)


def test_a_revoked_certificate_is_cut_off_and_refused_after_the_reload(edge, tmp_path):
    settings, url, metrics_port = edge
    vin = "WVWZZZ1JZXW0000C3"
    creds = credentials(settings, vin)
    uplink = VehicleUplink(url, creds, tmp_path / "spool")
    try:
        uplink.send(upload(vin, 0))
        assert uplink.wait_acknowledged(30), uplink.report
        assert uplink.report.connects == 1
        revoke(settings.pki_path, creds.cert, reason="stolen")
        deadline = time.monotonic() + 20
        while not uplink.report.connect_failures:  # cut off (4001), and not let back in
            assert time.monotonic() < deadline, uplink.report
            time.sleep(0.05)
        uplink.send(upload(vin, 1))
        assert not uplink.wait_acknowledged(2)
    finally:
        report = uplink.close()
    assert report.connects == 1  # never again after the revocation
    assert f"{vin}-00001" not in vehicle_upload_ids(settings, vin)
    refused = scrape(metrics_port)
    assert refused['vtp_gateway_connections_refused_total{reason="revoked",region="eu"}'] >= 1


def test_a_tls_client_without_a_certificate_is_refused(edge):
    settings, url, _ = edge
    host, port = url.removeprefix("wss://").split("/")[0].rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(settings.pki_path / "edge-ca.pem"))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(b"GET /v1/uploads HTTP/1.1\r\nHost: x\r\n\r\n")
        try:  # TLS 1.3: the server's refusal arrives with the first read, as an alert
            answer = tls.recv(100)  # or as a plain close
        except (ssl.SSLError, ConnectionResetError):
            answer = b""
    assert answer == b""


def test_a_spool_outlives_its_process_and_acknowledged_uploads_are_not_sent_again(edge, tmp_path):
    settings, url, _ = edge
    vin = "WVWZZZ1JZXW0000D4"
    creds = credentials(settings, vin)
    dead = f"wss://127.0.0.1:{free_port()}{edge_wire.PATH}"  # nothing listens there
    offline = VehicleUplink(dead, creds, tmp_path / "spool")
    for n in range(5):
        offline.send(upload(vin, n))
    assert not offline.wait_acknowledged(0.5)
    offline.close()
    online = VehicleUplink(url, creds, tmp_path / "spool")
    try:
        assert online.wait_acknowledged(30), online.report
    finally:
        online.close()
    again = VehicleUplink(url, creds, tmp_path / "spool")
    try:
        again.send(upload(vin, 5))
        assert again.wait_acknowledged(30), again.report
    finally:
        report = again.close()
    assert report.acknowledged == 1
    assert vehicle_upload_ids(settings, vin) == [f"{vin}-{n:05d}" for n in range(6)]


def test_an_oversize_frame_closes_the_stream_before_it_is_buffered(edge):
    settings, url, metrics_port = edge
    vin = "WVWZZZ1JZXW0000E5"
    creds = credentials(settings, vin)

    async def send_big() -> int | None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, ssl=creds.context(), max_msg_size=1 << 20) as ws,
        ):
            await ws.send_bytes(b"\xc3\x01" + b"\x00" * settings.max_upload_bytes)
            async for _ in ws:
                pass
        await asyncio.sleep(0.25)  # the TLS transport closes (aiohttp's graceful shutdown)
        return ws.close_code

    # the gateway answers 1009 from the frame's header and closes; a client still
    # writing the rest may see the reset (1006) before the close frame
    assert asyncio.run(send_big()) in (edge_wire.CLOSE_TOO_BIG, 1006)
    oversize = 'vtp_gateway_oversize_frames_total{region="eu"}'
    # counted once the gateway's close handshake ends (up to its 10 s close timeout)
    assert eventually(lambda: scrape(metrics_port).get(oversize) == 1, 30)


def test_the_gateway_stops_cleanly_on_sigterm(region_stack):
    settings = region_stack("eu", "edgestop")
    init_region(settings.pki_path, "eu")
    process, _ = start_gateway(settings)
    os.kill(process.popen.pid, signal.SIGTERM)
    assert process.popen.wait(30) == 0
    assert not (settings.home / "gateway.json").exists()


def _masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (mask 0: the payload goes as it is)."""
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else b"\xfe" + n.to_bytes(2, "big")
    return bytes([0x80 | opcode]) + size + b"\x00\x00\x00\x00" + payload


UPGRADE = (
    b"GET /v1/uploads HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def _read_until_closed(reader: asyncio.StreamReader, limit_s: float) -> tuple[bytes, float]:
    """What the gateway sent until it closed the connection, and how long that took."""
    started = time.monotonic()
    got = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        while chunk := await asyncio.wait_for(reader.read(65536), limit_s):
            got += chunk
    return got, time.monotonic() - started


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("wss://").split("/")[0].rsplit(":", 1)
    return host, int(port)


def test_a_stream_sending_only_refused_frames_is_closed(edge):
    settings, url, _ = edge
    creds = credentials(settings, "WVWZZZ1JZXW0000F6")

    async def garbage() -> bytes:
        reader, writer = await asyncio.open_connection(*_host_port(url), ssl=creds.context())
        writer.write(UPGRADE)
        assert b" 101 " in await reader.readline()
        for _ in range(300):
            writer.write(_masked(0x2, b"junk"))
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.drain()
        got, _ = await _read_until_closed(reader, 30)
        writer.close()
        await asyncio.sleep(0.25)
        return got

    got = asyncio.run(garbage())
    assert got.count(b'"not_single_object"') <= 101  # answered until the limit, then closed
    assert b"\x88\x19\x03\xf0" in got  # a close frame, 1008, with its reason


def test_a_connection_that_never_opens_its_stream_is_closed(edge):
    settings, url, _ = edge
    creds = credentials(settings, "WVWZZZ1JZXW0000G7")

    async def idle() -> float:
        reader, writer = await asyncio.open_connection(*_host_port(url), ssl=creds.context())
        _, took = await _read_until_closed(reader, 60)
        writer.close()
        await asyncio.sleep(0.25)
        return took

    assert asyncio.run(idle()) < 30  # closed after about 10 s, not the hour of a keep-alive


def test_a_revoked_or_greedy_certificate_is_closed_right_after_the_handshake(edge, tmp_path):
    settings, url, metrics_port = edge
    greedy = credentials(settings, "WVWZZZ1JZXW0000H8")
    revoked = credentials(settings, "WVWZZZ1JZXW0000J9")
    serials = 'vtp_gateway_revoked_serials{region="eu"}'
    listed = scrape(metrics_port)[serials]
    revoke(settings.pki_path, revoked.cert)
    refused = 'vtp_gateway_connections_refused_total{reason="revoked",region="eu"}'
    before = scrape(metrics_port)[refused]

    async def connections(creds: VehicleCredentials, n: int) -> list[bytes]:
        opened = [
            await asyncio.open_connection(*_host_port(url), ssl=creds.context()) for _ in range(n)
        ]
        got = [(await _read_until_closed(r, 5))[0] for r, _ in opened]
        for _, w in opened:
            w.close()
        await asyncio.sleep(0.25)
        return got

    assert eventually(lambda: scrape(metrics_port)[serials] == listed + 1, 20)
    assert asyncio.run(connections(revoked, 2)) == [b"", b""]
    assert scrape(metrics_port)[refused] == before + 2
    per_vehicle = 'vtp_gateway_connections_refused_total{reason="too_many_per_vehicle",region="eu"}'
    asyncio.run(connections(greedy, 5))  # three may wait for their stream; two are closed
    assert scrape(metrics_port)[per_vehicle] >= 2


def test_an_upload_of_a_schema_the_gateway_does_not_know_is_refused_by_its_id(edge, tmp_path):
    settings, url, _ = edge
    vin = "WVWZZZ1JZXW0000K1"
    uplink = VehicleUplink(url, credentials(settings, vin), tmp_path / "spool")
    from schemas import default_store

    store = default_store()
    framed = store.encode(upload(vin, 0), store.get("VehicleUpload"))
    newer = framed[:2] + b"\x01" * 8 + framed[10:]  # a writer schema from a later release
    try:
        uplink.send_encoded(f"{vin}-00000", newer)
        uplink.send(upload(vin, 1))
        assert uplink.wait_acknowledged(30), uplink.report
    finally:
        report = uplink.close()
    assert [(i, r) for i, r, _ in report.refused] == [(f"{vin}-00000", "unknown_schema")]
    assert vehicle_upload_ids(settings, vin) == [f"{vin}-00001"]


def test_a_gateway_without_its_deny_list_does_not_start(region_stack):
    settings = region_stack("eu", "edgenolist")
    init_region(settings.pki_path, "eu")
    (settings.pki_path / "revoked.txt").unlink()
    with pytest.raises(RuntimeError, match="deny-list"):
        start_gateway(settings)

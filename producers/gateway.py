"""`vtp gateway`: a region's vehicle edge. Vehicles connect over mutual TLS with a
certificate from the region's vehicle CA naming their VIN, stream uploads over one
WebSocket each (producers/edge_wire.py has the protocol), and hear back about each
upload once Kafka has it. The decisions are producers/edge.py's; this is the server.

Why a WebSocket stream, not an HTTP/2 POST per upload: a vehicle keeps one connection
open for hours and sends an upload every few seconds; a frame per upload costs a few
bytes of framing where a request costs headers, and answers by upload id can come back
in whatever order Kafka acknowledges. A stream also carries backpressure for free: a
gateway that stops reading stops the vehicle through TCP. aiohttp (already here for
Faust) parses frames in C; Python's HTTP/2 servers are pure Python.

What the gateway refuses, and where:
- the TLS handshake: no certificate, one that does not chain to this region's vehicle CA
  (another maker's, another region's, a forged one), an expired one, one not for client
  authentication;
- before the stream opens: a certificate whose subject is not a VIN or whose serial is
  revoked (403; ``revoked.txt`` is reread every VTP_GATEWAY_REVOKED_RELOAD_S and on
  SIGHUP, and live streams of a newly revoked serial are closed, 4001); more than
  VTP_GATEWAY_MAX_CONNECTIONS vehicles (503);
- per upload, for good (``refused``): not single-object Avro, an unknown schema, a body
  VIN other than the certificate's, a bad upload id, too many samples; a frame over
  VTP_MAX_UPLOAD_BYTES closes the stream (1009) before it is buffered whole;
- per upload, for now (``retry``): the vehicle is over its rate (a token bucket per VIN),
  Kafka holds VTP_GATEWAY_INFLIGHT_MB of unacknowledged uploads (backpressure), Kafka
  failed the write, the gateway is stopping.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import ssl
import time
import weakref
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from confluent_kafka import KafkaError, Producer

from producers import edge_wire
from producers.edge import Connection, DeliveryPump, Edge, certificate_identity
from producers.pki import RegionPKI, read_revoked
from vtp.core import metrics as m
from vtp.core.kafka import producer_config
from vtp.core.listen import listening_socket
from vtp.core.settings import Settings
from vtp.core.topics import check_cluster_region

log = logging.getLogger("vtp.gateway")

# Answers a stream may owe before the gateway stops reading it: a vehicle that does not
# read its answers stalls itself (through TCP), not the gateway.
UNANSWERED_PER_STREAM = 256
HANDSHAKE_TIMEOUT_S = 10.0
# TLS handshakes under way at once: a peer that never finishes one holds a slot for
# HANDSHAKE_TIMEOUT_S, and each slot holds a TLS read buffer.
HANDSHAKES_AT_ONCE = 1024
# Connections beyond VTP_GATEWAY_MAX_CONNECTIONS that may be open while they are answered
# (a 503, a 403): past this the gateway stops accepting, and the kernel's backlog waits.
CONNECTION_SLACK = 256
# asyncio gives every TLS connection a 256 KiB read buffer (sslproto.SSLProtocol.max_size):
# 5 GiB for 20,000 idle vehicles. TLS records are at most 16 KiB; the gateway reads 32 KiB.
TLS_READ_BUFFER = 32 * 1024
HEARTBEAT_S = 30.0
# A vehicle opens one stream; a few connections per VIN cover reconnects under way.
CONNECTIONS_PER_VEHICLE = 3
UPGRADE_WITHIN_S = 10.0
# Frames refused for good one stream may send before it is closed: a vehicle sending
# garbage costs the event loop as much as one sending uploads, without a rate limit.
REFUSALS_PER_STREAM = 100
CLOSE_POLICY = 1008
STOP_FLUSH_S = 10.0


class GatewayError(RuntimeError):
    """`vtp gateway` cannot start."""


def address_file(settings: Settings) -> Path:
    return settings.home / "gateway.json"


def server_context(files: RegionPKI) -> ssl.SSLContext:
    """Mutual TLS: only certificates chaining to the region's vehicle CA get through the
    handshake (OpenSSL also checks they are meant for client authentication)."""
    for path in (files.vehicle_ca, files.gateway_cert, files.gateway_key):
        if not path.is_file():
            raise GatewayError(
                f"{path} is missing: create the region's development PKI with `vtp pki init`, "
                "or point VTP_PKI_DIR at your own (README, The vehicle edge)"
            )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(files.vehicle_ca))
    context.load_cert_chain(str(files.gateway_cert), str(files.gateway_key))
    return context


def gateway_producer(settings: Settings, failed: list[str]) -> Producer:
    """The gateway's producer; a fatal error lands in ``failed`` and stops the gateway
    (its vehicles resend to the next one)."""
    last: dict[int, float] = {}

    def on_error(error: KafkaError) -> None:
        if error.fatal():
            log.error("Kafka producer failed for good: %s; stopping", error)
            failed.append(str(error))
            signal.raise_signal(signal.SIGTERM)
            return
        # librdkafka reports a broker that is down every second: once a minute is plenty
        now = time.monotonic()
        if now - last.get(error.code(), -60.0) >= 60.0:
            last[error.code()] = now
            log.warning(
                "Kafka: %s (uploads wait; vehicles are told when the budget is full)", error
            )

    return Producer(
        {
            **producer_config(settings.bootstrap(), settings.kafka_extra),
            # An acknowledgement is what the vehicle waits for: a short linger.
            "linger.ms": 5,
            # A write is never given up on here: while Kafka is down, uploads wait (their
            # bytes bounded by VTP_GATEWAY_INFLIGHT_MB) and vehicles keep the rest.
            "message.timeout.ms": 0,
            "error_cb": on_error,
        }
    )


def _bind(host: str, port: int) -> socket.socket:
    try:
        sock = listening_socket(host, port, port_setting="VTP_GATEWAY_PORT", backlog=1024)
    except OSError as exc:
        raise GatewayError(exc.strerror) from None
    sock.setblocking(False)
    return sock


def run_gateway(settings: Settings) -> int:
    region = settings.need_region()
    files = RegionPKI(settings.pki_path, ())
    context = server_context(files)
    try:  # refusing nobody must be a file that says so: a missing list stops the start
        revoked = _serials(read_revoked(files.revoked))
    except (OSError, ValueError) as exc:
        raise GatewayError(
            f"the deny-list {files.revoked} cannot be read ({exc}): `vtp pki init` makes an "
            "empty one"
        ) from None
    kafka_limit = int(settings.kafka_extra.get("message.max.bytes", 1_000_000))
    if settings.max_upload_bytes + 4096 > kafka_limit:
        raise GatewayError(
            f"VTP_MAX_UPLOAD_BYTES={settings.max_upload_bytes} does not fit the producer's "
            f"message.max.bytes={kafka_limit} with its framing: lower it or raise that"
        )
    check_cluster_region(settings)
    sock = _bind(settings.gateway_host, settings.gateway_port)
    failed: list[str] = []
    producer = gateway_producer(settings, failed)
    m.serve_metrics(settings.metrics_port, settings.metrics_host)
    edge = Edge(settings, producer)
    edge.set_revoked(revoked)
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    for reason in ("not_a_vehicle", "revoked", "too_many_connections"):
        m.GATEWAY_CONNECTIONS_REFUSED.labels(region, reason)
    for counter in (
        m.GATEWAY_TCP_ACCEPTED,
        m.GATEWAY_HANDSHAKES_REFUSED,
        m.GATEWAY_OVERSIZE,
        m.GATEWAY_REVOKED_RELOAD_FAILURES,
    ):
        counter.labels(region)  # exported at 0 from the start
    log.info("vehicle gateway for %s: %d revoked serials", region, len(revoked))
    # Each upload in flight holds a few small objects until Kafka acknowledges it; with
    # tens of thousands in flight the default collector rescans them all the time (30 %
    # of a core in the bench). What start-up made is frozen; collections come rarer.
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    asyncio.run(Gateway(settings, edge, files).serve(sock, context))
    return 1 if failed else 0


def _serials(hex_serials: frozenset[str]) -> frozenset[int]:
    return frozenset(int(s, 16) for s in hex_serials)


class Gateway:
    def __init__(self, settings: Settings, edge: Edge, files: RegionPKI):
        self.settings = settings
        self.edge = edge
        self.files = files
        self.region = edge.region
        self.reload_now = asyncio.Event()
        self.closing: set[asyncio.Task[Any]] = set()
        self.handshaking = 0
        self.transports: set[asyncio.BaseTransport] = set()
        self.by_vin: dict[str, set[asyncio.BaseTransport]] = {}
        self.streaming: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()

    def close_stream(self, conn: Connection, code: int, why: bytes) -> None:
        """Closes a vehicle's stream from outside its handler (which then ends)."""
        task = asyncio.create_task(conn.ws.close(code=code, message=why))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    async def serve(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        pump = DeliveryPump(self.edge, loop)
        pump.start()
        app = web.Application()
        app.router.add_get(edge_wire.PATH, self.stream)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        handler = runner.server
        assert handler is not None  # set up above
        acceptor = asyncio.create_task(self.accept(sock, context, handler))
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_now.set)
        watcher = asyncio.create_task(self.watch_revoked())
        host, port = sock.getsockname()[:2]
        where = address_file(self.settings)
        where.parent.mkdir(parents=True, exist_ok=True)
        url = f"wss://{host}:{port}{edge_wire.PATH}"
        where.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        log.info("vehicle gateway for %s on %s", self.region, url)
        try:
            await stop.wait()
        finally:
            where.unlink(missing_ok=True)
            watcher.cancel()
            acceptor.cancel()
            sock.close()
            await self.stop(pump)
            await runner.cleanup()

    async def accept(self, sock: socket.socket, context: ssl.SSLContext, protocol: Any) -> None:
        """Accepts connections while there is room (asyncio's own server accepts without
        bound): at most HANDSHAKES_AT_ONCE handshakes, and VTP_GATEWAY_MAX_CONNECTIONS +
        CONNECTION_SLACK connections; beyond that, new ones wait in the kernel's backlog."""
        loop = asyncio.get_running_loop()
        cap = self.settings.gateway_max_connections + CONNECTION_SLACK
        accepted = m.GATEWAY_TCP_ACCEPTED.labels(self.region)
        while True:
            while self.handshaking >= HANDSHAKES_AT_ONCE or self.open_connections() >= cap:
                await asyncio.sleep(0.05)
            conn, _ = await loop.sock_accept(sock)
            accepted.inc()
            self.handshaking += 1
            task = asyncio.create_task(self.handshake(conn, context, protocol))
            self.closing.add(task)
            task.add_done_callback(self.closing.discard)

    async def handshake(self, conn: socket.socket, context: ssl.SSLContext, protocol: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                protocol, conn, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            # no certificate, another CA, expired, not for clients, or never finished
            m.GATEWAY_HANDSHAKES_REFUSED.labels(self.region).inc()
            log.debug("handshake refused: %s", exc)
            conn.close()
            return
        finally:
            self.handshaking -= 1
        why = self.first_look(transport)
        if why:
            m.GATEWAY_CONNECTIONS_REFUSED.labels(self.region, why).inc()
            transport.close()
            return
        self.transports.add(transport)
        # a connection that does not open its stream soon is closed: an idle TLS
        # connection holds a slot and a buffer
        loop.call_later(UPGRADE_WITHIN_S, self.close_unless_streaming, transport)

    def first_look(self, transport: asyncio.BaseTransport) -> str | None:
        """Why a connection that passed the handshake is closed at once, before any HTTP:
        its certificate names no VIN or is revoked, or its VIN holds enough connections
        already (a stolen certificate cannot fill the gateway)."""
        identity = certificate_identity(transport.get_extra_info("peercert"))
        if identity is None:
            return "not_a_vehicle"
        vin, serial = identity
        if serial in self.edge.revoked:
            return "revoked"
        mine = {t for t in self.by_vin.get(vin, ()) if not t.is_closing()}
        if len(mine) >= CONNECTIONS_PER_VEHICLE:
            return "too_many_per_vehicle"
        mine.add(transport)
        self.by_vin[vin] = mine
        return None

    def close_unless_streaming(self, transport: asyncio.BaseTransport) -> None:
        if transport not in self.streaming and not transport.is_closing():
            transport.close()

    def open_connections(self) -> int:
        self.transports = {t for t in self.transports if not t.is_closing()}
        if len(self.by_vin) > 2 * len(self.transports) + 1024:  # now and then, not always
            self.by_vin = {
                v: live
                for v, ts in self.by_vin.items()
                if (live := {t for t in ts if not t.is_closing()})
            }
        return self.handshaking + len(self.transports)

    async def stop(self, pump: DeliveryPump) -> None:
        """Stops taking uploads, lets Kafka acknowledge what it has, tells the vehicles,
        then closes: a vehicle resends only what was never acknowledged."""
        edge = self.edge
        edge.stopping = True
        pump.stopping.set()
        await asyncio.to_thread(pump.join)
        left = await asyncio.to_thread(edge.producer.flush, STOP_FLUSH_S)
        batch, edge.deliveries = edge.deliveries, []
        edge.on_delivered(batch)
        await asyncio.sleep(0)  # the answer writers run
        for conn in list(edge.connections.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.drained(), 2.0)
            await conn.ws.close(code=1001, message=b"gateway stopping")
        log.info("vehicle gateway stopped; %d uploads not acknowledged by Kafka", left)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport else None
        identity = certificate_identity(peercert)
        if identity is None:
            return self._refuse("not_a_vehicle", 403, "the certificate names no VIN")
        vin, serial = identity
        why = self.edge.admit(vin, serial)
        if why == "revoked":
            return self._refuse(why, 403, "this certificate is revoked")
        if why:
            return self._refuse(why, 503, "too many vehicles connected: try again later")
        ws = web.WebSocketResponse(
            max_msg_size=self.settings.max_upload_bytes + 1,  # aiohttp refuses the limit itself
            compress=False,  # no inflating a small frame into a large one
            heartbeat=HEARTBEAT_S,
        )
        if not ws.can_prepare(request).ok:
            response = web.Response(status=400, text="a vehicle stream is a WebSocket\n")
            response.force_close()
            return response
        await ws.prepare(request)
        if transport is not None:
            self.streaming.add(transport)
        conn = Connection(vin, serial, ws)
        older = self.edge.opened(conn)
        if older is not None:
            self.close_stream(older, edge_wire.CLOSE_REPLACED, b"replaced by a newer stream")
        writer = asyncio.create_task(self.write_answers(conn))
        try:
            await self.read_uploads(conn)
        finally:
            self.edge.closed(conn)
            writer.cancel()
        return ws

    def _refuse(self, reason: str, status: int, text: str) -> web.Response:
        m.GATEWAY_CONNECTIONS_REFUSED.labels(self.region, reason).inc()
        headers = {"Retry-After": "30"} if status == 503 else None
        response = web.Response(status=status, text=f"{reason}: {text}\n", headers=headers)
        response.force_close()  # no keep-alive for a connection that will not stream
        return response

    async def read_uploads(self, conn: Connection) -> None:
        ws, edge = conn.ws, self.edge
        while True:
            if conn.unanswered >= UNANSWERED_PER_STREAM:
                if conn.closed:  # its writer ended: no one will make room
                    return
                conn.room.clear()
                try:
                    await asyncio.wait_for(conn.room.wait(), HEARTBEAT_S)
                except TimeoutError:
                    await ws.close(code=CLOSE_POLICY, message=b"answers not read")
                    return
                if conn.closed or ws.closed:
                    return
            message = await ws.receive()
            if message.type is WSMsgType.BINARY:
                edge.on_upload(conn, message.data, time.monotonic())
            elif message.type is WSMsgType.TEXT:
                edge.on_text(conn, message.data)
            elif message.type is WSMsgType.ERROR:
                if getattr(message.data, "code", None) == edge_wire.CLOSE_TOO_BIG:
                    m.GATEWAY_OVERSIZE.labels(self.region).inc()
                return
            else:  # close, closing, closed
                return
            if conn.refusals > REFUSALS_PER_STREAM:
                await ws.close(code=CLOSE_POLICY, message=b"too many refused frames")
                return

    async def write_answers(self, conn: Connection) -> None:
        ws = conn.ws
        try:
            while True:
                await conn.wake.wait()
                conn.wake.clear()
                answered = 0
                if conn.acks:
                    ids, conn.acks = conn.acks, []
                    answered += len(ids)
                    await ws.send_str(edge_wire.ack_message(ids))
                while conn.others:
                    answered += 1
                    await ws.send_str(conn.others.popleft())
                conn.unanswered -= answered
                if conn.unanswered < UNANSWERED_PER_STREAM:
                    conn.room.set()
        except (ConnectionError, RuntimeError):
            return  # the vehicle went away; what it was not told, it sends again
        finally:
            conn.closed = True
            conn.room.set()  # the reader, if it waits for room, ends

    async def watch_revoked(self) -> None:
        """Rereads the deny-list when it changes; a list that cannot be read leaves the
        one in force (failing closed), and says so."""
        path = self.files.revoked
        last = _stamp(path)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.reload_now.wait(), self.settings.gateway_revoked_reload_s
                )
            forced = self.reload_now.is_set()
            self.reload_now.clear()
            self.edge.forget_idle_buckets(time.monotonic())
            try:
                stamp = _stamp(path)
                if stamp == last and not forced:
                    continue
                last = stamp
                serials = _serials(read_revoked(path))
            except (OSError, ValueError) as exc:
                m.GATEWAY_REVOKED_RELOAD_FAILURES.labels(self.region).inc()
                log.error("deny-list %s not reloaded, the previous one stays: %s", path, exc)
                continue
            cut = self.edge.set_revoked(serials)
            for conn in cut:
                self.close_stream(conn, edge_wire.CLOSE_REVOKED, b"certificate revoked")
            log.info("deny-list reloaded: %d serials; %d streams closed", len(serials), len(cut))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced (None: it is gone; another OSError, such as
    a broken link or no permission, is raised for the caller to count)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino

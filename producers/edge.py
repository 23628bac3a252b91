"""The gateway's decisions, upload by upload (producers/gateway.py is the server around
them): what a verified vehicle may do, what happens to each upload, and Kafka's
acknowledgements turned into answers. Sockets and the Kafka producer are handed in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from producers import edge_wire
from producers.edge_wire import EdgeRefusal, TokenBucket
from schemas import MAX_ID_CHARS, default_store
from schemas.registry import VIN_PATTERN
from vtp.core import metrics as m
from vtp.core.settings import Settings

log = logging.getLogger("vtp.gateway")

BACKLOG_RETRY_S = 1.0
KAFKA_FAILED_RETRY_S = 5.0


def certificate_identity(peercert: dict[str, Any] | None) -> tuple[str, int] | None:
    """The VIN (the subject's one common name) and serial of a verified peer certificate;
    None when it names no VIN."""
    if not peercert:
        return None
    names = [
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    try:
        serial = int(peercert.get("serialNumber", ""), 16)
    except ValueError:
        return None
    if len(names) != 1 or not VIN_PATTERN.match(names[0]):
        return None
    return names[0], serial


class Connection:
    """One vehicle's WebSocket: what it owes the vehicle and whether it holds uploads."""

    __slots__ = (
        "acks",
        "closed",
        "held",
        "others",
        "refusals",
        "room",
        "serial",
        "unanswered",
        "vin",
        "vin_key",
        "wake",
        "ws",
    )

    def __init__(self, vin: str, serial: int, ws: web.WebSocketResponse):
        self.vin = vin
        self.vin_key = vin.encode()
        self.serial = serial
        self.ws = ws
        self.acks: list[str] = []
        self.others: collections.deque[str] = collections.deque()
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.unanswered = 0
        self.refusals = 0  # frames refused for good on this stream
        self.held = False
        self.closed = False

    def answer(self, text: str) -> None:
        self.others.append(text)
        self.wake.set()

    def ack(self, upload_id: str) -> None:
        self.acks.append(upload_id)
        self.wake.set()

    async def drained(self) -> None:
        """Until every answer owed has been written."""
        while self.unanswered > 0 and not self.closed:
            self.room.clear()
            await self.room.wait()


Delivery = tuple[Connection, str, int, float, KafkaError | None]


class Edge:
    """The gateway's decisions, upload by upload; sockets and Kafka are handed in."""

    def __init__(self, settings: Settings, producer: Producer):
        self.settings = settings
        self.region = settings.need_region()
        self.topic = settings.topics.uploads
        self.producer = producer
        self.fingerprints = default_store().fingerprints("VehicleUpload")
        self.inflight_limit = int(settings.gateway_inflight_mb * 2**20)
        self.inflight_bytes = 0
        self.backpressure = False
        self.connections: dict[str, Connection] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.revoked: frozenset[int] = frozenset()
        self.deliveries: list[Delivery] = []  # filled by the pump thread
        self.stopping = False
        # Every series exists from the start (at 0, so alerts see a first increase), and
        # the per-upload ones are bound once: labels() per upload cost 15 % of a core.
        region = self.region
        m.GATEWAY_INFLIGHT_BYTES.labels(region).set_function(lambda: self.inflight_bytes)
        m.GATEWAY_CONNECTIONS.labels(region).set_function(lambda: len(self.connections))
        m.GATEWAY_BACKPRESSURE.labels(region).set(0)
        self.accepted = m.GATEWAY_ACCEPTED.labels(region)
        self.ack_seconds = m.GATEWAY_ACK_SECONDS.labels(region)
        self.refused = {r: m.GATEWAY_REFUSED.labels(region, r) for r in edge_wire.REFUSAL_REASONS}
        self.retried = {r: m.GATEWAY_RETRIED.labels(region, r) for r in edge_wire.RETRY_REASONS}

    # -- connections ---------------------------------------------------------------
    def admit(self, vin: str, serial: int) -> str | None:
        """Why a verified vehicle may not open a stream, or None."""
        if serial in self.revoked:
            return "revoked"
        if (
            vin not in self.connections
            and len(self.connections) >= self.settings.gateway_max_connections
        ):
            return "too_many_connections"
        return None

    def opened(self, conn: Connection) -> Connection | None:
        """Registers ``conn``; returns the vehicle's older connection, which it replaces."""
        older = self.connections.get(conn.vin)
        self.connections[conn.vin] = conn
        return older

    def closed(self, conn: Connection) -> None:
        conn.closed = True
        if self.connections.get(conn.vin) is conn:
            del self.connections[conn.vin]

    def set_revoked(self, serials: frozenset[int]) -> list[Connection]:
        """The new deny-list; returns the live connections it now refuses."""
        self.revoked = serials
        m.GATEWAY_REVOKED.labels(self.region).set(len(serials))
        return [c for c in self.connections.values() if c.serial in serials]

    # -- uploads -------------------------------------------------------------------
    def on_upload(self, conn: Connection, frame: bytes, now: float) -> None:
        conn.unanswered += 1
        if conn.held or self.stopping:
            self._retry(
                conn,
                _upload_id(frame),
                "shutting_down" if self.stopping else "held",
                BACKLOG_RETRY_S,
            )
            return
        try:
            head = edge_wire.read_head(
                frame,
                self.fingerprints,
                vin=conn.vin,
                max_samples=self.settings.max_samples_per_upload,
                max_id_chars=MAX_ID_CHARS,
            )
        except EdgeRefusal as refusal:
            self.refused[refusal.reason].inc()
            conn.refusals += 1
            # named whenever it can be read, so that the vehicle can match the answer
            upload_id = refusal.upload_id or _upload_id(frame)
            conn.answer(edge_wire.refused_message(upload_id, refusal.reason, refusal.detail))
            return
        bucket = self.buckets.get(conn.vin)
        if bucket is None:
            bucket = self.buckets[conn.vin] = TokenBucket(
                self.settings.gateway_rate, self.settings.gateway_burst, now
            )
        wait = bucket.take(now)
        if wait > 0:
            self._retry(conn, head.upload_id, "rate_limited", wait)
            return
        if self.inflight_bytes + len(frame) > self.inflight_limit:
            self._pushing_back(True)
            self._retry(conn, head.upload_id, "kafka_backlog", BACKLOG_RETRY_S)
            return
        try:
            self.producer.produce(
                self.topic,
                value=frame,
                key=conn.vin_key,
                on_delivery=self._reporter(conn, head.upload_id, len(frame), now),
            )
        except BufferError:
            self._pushing_back(True)
            self._retry(conn, head.upload_id, "kafka_backlog", BACKLOG_RETRY_S)
            return
        except KafkaException as exc:  # the producer cannot take it now (or ever: logged)
            log.warning("Kafka refused upload %s of %s: %s", head.upload_id, conn.vin, exc)
            self._retry(conn, head.upload_id, "kafka_unavailable", KAFKA_FAILED_RETRY_S)
            return
        self.inflight_bytes += len(frame)

    def _reporter(
        self, conn: Connection, upload_id: str, size: int, at: float
    ) -> Callable[[KafkaError | None, Message], None]:
        # Runs in the pump thread, inside poll(): the list it appends to is the one the
        # pump hands over next.
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            self.deliveries.append((conn, upload_id, size, at, err))

        return delivered

    def _retry(self, conn: Connection, upload_id: str, reason: str, after_s: float) -> None:
        conn.held = True
        self.retried[reason].inc()
        conn.answer(edge_wire.retry_message([upload_id], reason, after_s))

    def on_text(self, conn: Connection, text: str) -> None:
        """``resume`` lifts a hold; any other text is an upload that is not one."""
        conn.unanswered += 1
        if text.strip() == edge_wire.RESUME or _is_resume(text):
            conn.held = False
            conn.unanswered -= 1
            return
        self.refused["not_an_upload"].inc()
        conn.refusals += 1
        conn.answer(edge_wire.refused_message("", "not_an_upload", "uploads are binary frames"))

    def on_delivered(self, batch: list[Delivery]) -> None:
        """Kafka's reports, on the loop: acknowledge to each vehicle."""
        now = time.monotonic()
        latency = self.ack_seconds
        accepted = 0
        for conn, upload_id, size, at, err in batch:
            self.inflight_bytes -= size
            if err is None:
                accepted += 1
                latency.observe(now - at)
                if not conn.closed:
                    conn.ack(upload_id)
            else:
                log.warning("Kafka did not take upload %s of %s: %s", upload_id, conn.vin, err)
                if not conn.closed:
                    self._retry(conn, upload_id, "kafka_unavailable", KAFKA_FAILED_RETRY_S)
        self.accepted.inc(accepted)
        if self.backpressure and self.inflight_bytes < self.inflight_limit // 2:
            self._pushing_back(False)

    def _pushing_back(self, on: bool) -> None:
        if on == self.backpressure:
            return
        self.backpressure = on
        m.GATEWAY_BACKPRESSURE.labels(self.region).set(int(on))
        if on:
            log.warning(
                "Kafka is not keeping up: %.1f MiB of uploads wait for its acknowledgement; "
                "vehicles are told to retry later (kafka_backlog)",
                self.inflight_bytes / 2**20,
            )
        else:
            log.info("Kafka caught up; uploads are taken again")

    def forget_idle_buckets(self, now: float) -> None:
        """A full bucket is what a new one would be: drop those of vehicles not connected."""
        for vin in [
            v for v, b in self.buckets.items() if v not in self.connections and b.full(now)
        ]:
            del self.buckets[vin]


class DeliveryPump(threading.Thread):
    """Serves librdkafka's delivery reports and hands them to the loop in batches."""

    def __init__(self, edge: Edge, loop: asyncio.AbstractEventLoop):
        super().__init__(name="gateway-deliveries", daemon=True)
        self.edge = edge
        self.loop = loop
        self.stopping = threading.Event()

    def run(self) -> None:
        edge = self.edge
        while not self.stopping.is_set():
            edge.producer.poll(0.02)
            if edge.deliveries:
                batch, edge.deliveries = edge.deliveries, []
                # the callbacks append to the old list until poll returns: none run now
                with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                    self.loop.call_soon_threadsafe(edge.on_delivered, batch)


def _upload_id(frame: bytes) -> str:
    """The id of an upload that is not being read (held back): best effort."""
    with contextlib.suppress(EdgeRefusal):
        return edge_wire.peek_upload_id(frame)
    return ""


def _is_resume(text: str) -> bool:
    if len(text) > 64:  # never parse what cannot be a resume
        return False
    with contextlib.suppress(ValueError):
        return bool(json.loads(text) == {"resume": True})
    return False

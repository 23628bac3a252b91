"""The vehicle's store-and-forward link to its region's gateway (`vtp gateway`).

    uplink = VehicleUplink(url, VehicleCredentials(cert, key, edge_ca), spool_folder)
    uplink.send(upload)          # durable on the vehicle before it returns
    uplink.wait_acknowledged(60) # True once the gateway acknowledged (or refused) it all
    report = uplink.close()

Every upload goes to the on-disk spool first (producers/spool.py), then over one mutual
TLS WebSocket to the gateway, oldest first, at most ``window`` unanswered at a time. An
acknowledged upload leaves the spool and is never sent again; anything else is sent again
after a reconnect or a ``retry``, in order, from the oldest not acknowledged. The spool
outlives the process: a new VehicleUplink on the same folder carries on where the last
one stopped. While the gateway cannot be reached, uploads wait in the spool, within its
size and age bounds (its stats say what was dropped and why).

Runs on the vehicle: imports only ``schemas`` and the vehicle-side modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import aiohttp

from producers import edge_wire
from producers.spool import Spool, SpoolStats
from schemas import MAX_ID_CHARS, MAX_UPLOAD_BYTES, SchemaStore, default_store

log = logging.getLogger("vtp.uplink")

# Uploads sent and not answered: a resend after a lost connection comes at most this many
# uploads late, well inside what the worker remembers to drop it (VTP_DEDUP_UPLOADS_PER_VEHICLE).
MAX_WINDOW = 32
RECONNECT_S = (0.2, 30.0)
STREAM_LIVED_S = 10.0  # first and longest wait between attempts (doubling, jittered)


@dataclass(frozen=True)
class VehicleCredentials:
    cert: Path  # the vehicle's certificate (CN = its VIN), from the region's vehicle CA
    key: Path
    edge_ca: Path  # the CA the region's gateway certificate chains to

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.edge_ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


@dataclass
class UplinkReport:
    acknowledged: int = 0
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (id, reason, detail)
    retried: dict[str, int] = field(default_factory=dict)  # by reason
    connects: int = 0
    connect_failures: int = 0
    last_error: str = ""
    spool: SpoolStats | None = None


class VehicleUplink:
    def __init__(
        self,
        url: str,
        credentials: VehicleCredentials,
        spool_folder: Path,
        *,
        window: int = 32,
        store: SchemaStore | None = None,
        schema_version: int | None = None,
        **spool_options: Any,
    ):
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1 to {MAX_WINDOW}")
        self.url = url
        self._context = credentials.context()
        self._store = store or default_store()
        self._schema = self._store.get("VehicleUpload", schema_version)
        self._spool = Spool(Path(spool_folder), **spool_options)
        self._window = window
        self.report = UplinkReport()
        self._closing = False
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._main, name="vehicle-uplink", daemon=True)
        self._thread.start()
        self._ready.wait()

    # -- the vehicle's side --------------------------------------------------------
    def send(self, upload: Mapping[str, Any]) -> int:
        """Encodes ``upload`` and keeps it in the spool until the gateway acknowledges it;
        returns its spool sequence number."""
        return self.send_encoded(str(upload["upload_id"]), self._store.encode(upload, self._schema))

    def send_encoded(self, upload_id: str, value: bytes) -> int:
        """An upload already framed (single-object Avro) with ``upload_id`` inside."""
        if len(value) > MAX_UPLOAD_BYTES:
            raise ValueError(
                f"upload {upload_id!r} is {len(value)} bytes; the gateway takes at most "
                f"{MAX_UPLOAD_BYTES}: send fewer samples per upload"
            )
        try:
            inside = edge_wire.peek_upload_id(value)
        except edge_wire.EdgeRefusal as exc:
            raise ValueError(f"upload {upload_id!r} is not a framed upload: {exc}") from None
        if inside != upload_id:
            raise ValueError(f"upload {upload_id!r} holds the id {inside!r}")
        if not 1 <= len(upload_id) <= MAX_ID_CHARS:
            raise ValueError(f"an upload id has 1 to {MAX_ID_CHARS} characters: {upload_id!r}")
        seq = self._spool.append(upload_id, value)
        self._wake()
        return seq

    def pending(self) -> int:
        return self._spool.stats.records_pending

    def wait_acknowledged(self, timeout: float) -> bool:
        """Whether the spool emptied (acknowledged, refused, dropped) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.pending() > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float = 5.0) -> UplinkReport:
        """Stops sending; what is not acknowledged stays in the spool for the next run."""
        self._closing = True
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive() and self._loop is not None and self._main_task is not None:
            # stuck in a connect or a send: cancelling unwinds it, closing its socket
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._main_task.cancel)
            self._thread.join(timeout)
        self.report.spool = self._spool.stats
        self._spool.close()
        return self.report

    def _wake(self) -> None:
        if self._loop is not None and self._wakeup is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._wakeup.set)

    # -- the link ------------------------------------------------------------------
    def _main(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main_task = asyncio.current_task()
        self._wakeup = asyncio.Event()
        self._ready.set()
        wait = RECONNECT_S[0]
        async with aiohttp.ClientSession() as session:
            while not self._closing:
                try:
                    async with session.ws_connect(
                        self.url,
                        ssl=self._context,
                        heartbeat=30,
                        autoping=True,
                        compress=0,
                        max_msg_size=1 << 20,
                    ) as ws:
                        self.report.connects += 1
                        stream = _Stream(self, ws)
                        await stream.run()
                    # Back to a short wait only after a stream that worked: one the gateway
                    # ends at once (an upload it will not take, say) is not retried hot.
                    if stream.answers or time.monotonic() - stream.opened >= STREAM_LIVED_S:
                        wait = RECONNECT_S[0]
                    if ws.close_code == edge_wire.CLOSE_REPLACED:
                        log.warning(
                            "another client streams with this vehicle's certificate: waiting"
                        )
                        wait = RECONNECT_S[1]
                except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
                    self.report.connect_failures += 1
                    self.report.last_error = f"{type(exc).__name__}: {exc}"
                    log.debug("uplink to %s: %s", self.url, self.report.last_error)
                if self._closing:
                    break
                await self._sleep(wait * random.uniform(0.5, 1.0))
                wait = min(RECONNECT_S[1], wait * 2)
        # aiohttp's graceful shutdown: the TLS transports close over the next iterations
        await asyncio.sleep(0.25)

    async def _sleep(self, seconds: float) -> None:
        assert self._wakeup is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed(), seconds)

    async def _closed(self) -> None:
        assert self._wakeup is not None
        while not self._closing:
            self._wakeup.clear()
            await self._wakeup.wait()


class _Stream:
    """One connection: sends from the spool in order, handles the answers."""

    def __init__(self, uplink: VehicleUplink, ws: aiohttp.ClientWebSocketResponse):
        self.uplink = uplink
        self.spool = uplink._spool
        self.ws = ws
        self.inflight: dict[str, int] = {}  # upload id -> spool seq, in sending order
        self.last_sent: int | None = None  # None: start from the oldest pending
        self.retry_at: float | None = None  # holding back until answered, then this time
        self.answered = asyncio.Event()
        self.answers = 0
        self.opened = time.monotonic()

    async def run(self) -> None:
        receiver = asyncio.create_task(self.receive())
        try:
            await self.send(receiver)
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver

    async def send(self, receiver: asyncio.Task[None]) -> None:
        uplink, wakeup = self.uplink, self.uplink._wakeup
        assert wakeup is not None
        while not uplink._closing and not receiver.done():
            if self.retry_at is not None:
                if self.inflight:
                    await self._until(self.answered, receiver)
                    continue
                await asyncio.sleep(max(0.0, self.retry_at - time.monotonic()))
                await self.ws.send_str(edge_wire.RESUME)
                self.retry_at = None
                self.last_sent = None
                continue
            room = uplink._window - len(self.inflight)
            entries = self.spool.pending(after_seq=self.last_sent, limit=room) if room > 0 else []
            if not entries:
                wakeup.clear()
                await self._until(wakeup if room > 0 else self.answered, receiver, 1.0)
                continue
            for entry in entries:
                self.inflight[entry.upload_id] = entry.seq
                self.last_sent = entry.seq
                await self.ws.send_bytes(entry.payload)

    async def _until(
        self, event: asyncio.Event, receiver: asyncio.Task[None], timeout: float | None = None
    ) -> None:
        waiter = asyncio.create_task(event.wait())
        await asyncio.wait({waiter, receiver}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        event.clear()

    async def receive(self) -> None:
        report = self.uplink.report
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            answer = edge_wire.parse_answer(message.data)
            self.answers += 1
            if answer.kind == "ack":
                # ids not sent on this stream (answers for an earlier one) are no one's
                popped = map(self.inflight.pop, answer.upload_ids, repeat(None))
                acked = [seq for seq in popped if seq is not None]
                self.spool.ack_many(acked)
                report.acknowledged += len(acked)
                self.answered.set()
                continue
            for upload_id in answer.upload_ids:
                seq = self.inflight.pop(upload_id, None)
                if seq is None:
                    if answer.kind == "refused":
                        # one of the uploads in flight, unknown which: waiting for its
                        # answer would hold the stream for ever; a new stream resends all
                        raise ValueError(f"the gateway refused an upload not sent: {answer}")
                    continue
                if answer.kind == "refused":
                    self.spool.refuse(seq, f"{answer.reason}: {answer.detail}")
                    report.refused.append((upload_id, answer.reason, answer.detail))
                    log.warning("upload %s refused: %s %s", upload_id, answer.reason, answer.detail)
                else:
                    report.retried[answer.reason] = report.retried.get(answer.reason, 0) + 1
                    at = time.monotonic() + answer.retry_after_s
                    self.retry_at = max(self.retry_at or 0.0, at)
            self.answered.set()
        close = self.ws.close_code
        if close and close != 1000:
            report.last_error = f"gateway closed the stream ({close})"

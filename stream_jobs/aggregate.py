"""Aggregation in the worker: accepted uploads -> trips, charges, daily summaries.

The validate agent hands each batch's accepted uploads here, already decoded, in the same
pass (an upload is read from Kafka and decoded once). Per-vehicle session state lives in
a changelog-backed Faust table keyed by VIN, so a restarted worker continues where it
was; the states of the vehicles in use are kept decoded in memory, and written at the
worker's checkpoints (``stream_jobs.checkpoint``: each state changed since the last,
once). Each batch ingests every upload, advances each touched vehicle once, and emits
records (Avro, keyed by VIN) to the region's aggregates topic. Samples that arrive after their time was
released are dead-lettered (reason too_late, stage aggregate) with the upload's bytes;
the samples themselves are still stored by the sink.

Every sample is aggregated for the owner registered at its event time. A registry change
(sale, move, deregistration) is applied by the registry agent of the same worker (the
registry topic is partitioned as the uploads are), between two batches of uploads, so the
old owner's sessions close even when no more samples of the vehicle come to this region.
An owner's erasure reaches the worker on the region's control topic (one notice per
vehicle the owner had here, sent by the erasure job): the state is rewritten without the
owner's data, so the changelog's compaction drops every earlier value that held it.

One lock orders the three writers of the state (uploads, registry changes, erasures) and
the checkpoints: a registry change or an erasure writes the states it changed at once,
a batch of uploads leaves them to the next checkpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import faust

from schemas import default_store
from schemas.aggregates import AggregateRecord, encode_aggregate
from schemas.registry import Registration
from stream_jobs import session_state
from stream_jobs.expiry import QuietSweep, forget_quiet, key_partition, sweep_interval_s
from stream_jobs.faust_fixes import exit_on_error, put_durably
from stream_jobs.session_state import VehicleState
from stream_jobs.sessions import SessionConfig, advance, flush, forget_owner, ingest, new_state
from vtp.core import headers as h
from vtp.core import metrics
from vtp.core.headers import deadletter_headers
from vtp.core.settings import Settings
from vtp.core.topics import SESSIONS_TABLE, changelog_configs

# Every topic the worker reads or writes carries bytes it encodes and decodes itself.
RAW_TOPIC: dict[str, Any] = {
    "key_type": bytes,
    "value_type": bytes,
    "key_serializer": "raw",
    "value_serializer": "raw",
}


def bytes_table(
    app: faust.App, name: str, settings: Settings, use_partitioner: bool = True
) -> faust.Table[bytes, bytes]:
    """A worker table keyed by VIN, its values bytes the worker encodes itself.
    ``use_partitioner``: its changelog writes go to the partition of their key's source
    messages (put_durably names it)."""
    return app.Table(  # type: ignore[return-value]  # Faust types app.Table as TableT
        name,
        default=None,
        key_type=bytes,
        value_type=bytes,
        use_partitioner=use_partitioner,
        extra_topic_configs=changelog_configs(settings),
    )


def session_config(settings: Settings) -> SessionConfig:
    return SessionConfig(
        trip_gap_ms=int(settings.trip_gap_s * 1000),
        charge_gap_ms=int(settings.charge_gap_s * 1000),
        allowed_lateness_ms=int(settings.allowed_lateness_s * 1000),
    )


def _headers(message: Any) -> list[tuple[str, bytes | None]]:
    """A consumed record's headers: aiokafka gives (name, value) pairs."""
    return list(message.headers or ())


@dataclass(slots=True)
class Accepted:
    """An upload the validate agent routed: its bytes, decoded record and raw position."""

    key: bytes
    value: bytes
    record: dict[str, Any]
    partition: int
    offset: int
    received_ms: int


Send = Callable[
    [str, bytes | None, bytes | None, list[tuple[str, bytes]] | None], Awaitable[Awaitable[Any]]
]


class Sessions:
    """The worker's per-vehicle session state and what changes it."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        registry: Callable[[str], Registration | None],
        send: Send,
    ):
        self.region = settings.need_region()
        self.settings = settings
        self.topics = settings.topics
        self.table = bytes_table(app, SESSIONS_TABLE, settings)
        self.registry = registry
        self.config = session_config(settings)
        self.lock = asyncio.Lock()
        self._app = app
        self._send = send
        self._store = default_store()
        self._decoded: dict[bytes, VehicleState] = {}
        self._changed: set[bytes] = set()  # since the last checkpoint
        self._sweep = QuietSweep(sweep_interval_s(settings.vehicle_state_ttl_s))

    def forget_decoded(self) -> None:
        """Partitions moved: what the table holds now is the truth, not what was decoded
        (what changed since the last checkpoint is read again by whoever has it now)."""
        self._decoded.clear()
        self._changed.clear()

    def _state(self, key: bytes) -> VehicleState:
        state = self._decoded.get(key)
        if state is None:
            stored = self.table.get(key)
            if stored:
                state = session_state.from_json(stored)
            else:
                vin = key.decode()
                reg = self.registry(vin)
                state = new_state(
                    vin,
                    self.region,
                    reg.time_zone if reg else "UTC",
                    reg.battery_capacity_kwh if reg else None,
                )
            self._decoded[key] = state
        return state

    async def _emit(self, vin: str, records: list[AggregateRecord], pending: list) -> None:
        for rec in records:
            metrics.AGGREGATE_RECORDS.labels(self.region, rec["kind"], str(rec["final"])).inc()
            pending.append(
                await self._send(
                    self.topics.aggregates, vin.encode(), encode_aggregate(rec, self._store), None
                )
            )

    async def _store_states(self, keys: Iterable[bytes]) -> None:
        """Durable: a state is acknowledged by Kafka before the uploads that made it are."""
        keys = list(keys)
        self._changed.difference_update(keys)
        partitions = self.settings.topic_partitions
        await asyncio.gather(
            *(
                put_durably(
                    self.table,
                    key,
                    session_state.to_json(self._decoded[key]),
                    key_partition(key, partitions),
                )
                for key in keys
            )
        )

    async def take(self, uploads: list[Accepted], pending: list) -> None:
        """Aggregate a batch's accepted uploads. The caller holds ``lock`` and awaits
        ``pending``; the states changed are written at the next checkpoint (``write``)."""
        touched: dict[bytes, VehicleState] = {}
        source_topic = self.topics.uploads
        for up in uploads:
            state = touched.get(up.key) or self._state(up.key)
            touched[up.key] = state
            vin = up.record["vin"]
            result = ingest(
                state,
                up.record,
                self.config,
                self.registry(vin),
                (f"{source_topic}:{up.partition}", up.offset),
                up.received_ms,
            )
            if result.too_late:
                metrics.AGGREGATE_TOO_LATE.labels(self.region).inc(len(result.too_late))
                detail = (
                    f"{len(result.too_late)} samples older than the released time; "
                    f"seq {result.too_late[:20]}"
                )
                source = f"{source_topic}:{up.partition}:{up.offset}"
                pending.append(
                    await self._send(
                        self.topics.deadletter,
                        up.key,
                        up.value,
                        deadletter_headers("aggregate", "too_late", detail, source),
                    )
                )
        for key, state in touched.items():
            vin = key.decode()
            await self._emit(vin, advance(state, self.config, self.registry(vin)), pending)
        self._changed.update(touched)

    async def write(self) -> None:
        """Checkpoint: durably, every state changed since the last (the caller holds
        ``lock``)."""
        await self._store_states(self._changed)

    async def registration_changed(self, changed: list[tuple[bytes, int]]) -> None:
        """Re-judge the periods of vehicles whose registration changed, at once: no more
        samples may come here for an owner whose time has ended."""
        async with self.lock:
            keys = [key for key, _ in changed if key in self._decoded or self.table.get(key)]
            pending: list = []
            for key in keys:
                vin = key.decode()
                records = advance(self._state(key), self.config, self.registry(vin), True)
                await self._emit(vin, records, pending)
            await asyncio.gather(*pending)
            await self._store_states(keys)

    async def take_notices(
        self, notices: list[tuple[bytes, list[tuple[str, bytes | None]]]]
    ) -> None:
        """Erasure notices from the control topic: forget the owner in each vehicle's state."""
        async with self.lock:
            keys = []
            for key, headers in notices:
                if h.header(headers, h.CONTROL) != h.ERASURE_CONTROL.decode():
                    continue
                if key not in self._decoded and self.table.get(key) is None:
                    # Nothing checkpointed for it (yet: uploads read since the last
                    # checkpoint are read again after a restart), so the erasure's horizon
                    # is recorded in a new state, for any vehicle registered here.
                    try:
                        if self.registry(key.decode()) is None:
                            continue
                    except UnicodeDecodeError:
                        continue
                owner = h.header(headers, h.ERASED_OWNER)
                horizon = h.header(headers, h.ERASURE_HORIZON_MS)
                if owner and horizon and horizon.isdigit():
                    state = self._state(key)
                    if forget_owner(state, owner, int(horizon), self.registry(key.decode())):
                        metrics.STATES_SCRUBBED.inc()
                    keys.append(key)
            await self._store_states(dict.fromkeys(keys))

    async def _close_quiet(self, key: bytes, value: bytes) -> None:
        state = self._decoded.pop(key, None) or session_state.from_json(value)
        pending: list = []
        await self._emit(state.vin, flush(state, self.config, self.registry(state.vin)), pending)
        await asyncio.gather(*pending)

    async def forget_quiet(self) -> None:
        """After a checkpoint (the table then holds what memory does): vehicles gone quiet
        close their sessions and leave the table. The caller holds ``lock``."""
        await forget_quiet(
            self.table,
            self._sweep,
            ttl_ms=int(self.settings.vehicle_state_ttl_s * 1000),
            partitions=self.settings.topic_partitions,
            assigned={
                tp.partition
                for tp in self._app.consumer.assignment()
                if tp.topic == self.topics.uploads
            },
            touched_of=session_state.touched_of,
            closing=self._close_quiet,
        )

    def add_notice_agent(self, app: faust.App, batch_max: int, within_s: float) -> None:
        async def apply_notices(stream: faust.Stream[Any]) -> None:
            async for events in stream.take_events(batch_max, within=within_s):
                await self.take_notices(
                    [(e.message.key or b"", _headers(e.message)) for e in events]
                )

        app.agent(app.topic(self.topics.control, **RAW_TOPIC), name="notices")(
            exit_on_error(apply_notices)
        )

"""The aggregation agent: the region's validated uploads -> trips, charges, daily summaries.

Per-vehicle session state lives in a changelog-backed Faust table keyed by VIN, so a
restarted worker continues where it was. Each batch ingests every upload, advances
each touched vehicle once, stores its state, and emits records (JSON, keyed by VIN)
to the region's aggregates topic. Samples that arrive after their time was released
are dead-lettered (reason too_late, stage aggregate) with the upload's bytes; the
samples themselves are still stored by the sink.

Every sample is aggregated for the owner registered at its event time. A registry
change (sale, move, deregistration) reaches this agent as a control message on the
validated topic, in order with the vehicle's uploads, so the old owner's sessions
close even when no more samples of the vehicle come to this region. An owner's erasure
reaches it the same way (one control message per vehicle the owner had here, sent by the
erasure job): the state is rewritten without the owner's data, so the changelog's
compaction drops every earlier value that held it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from schemas import FramingError, default_store
from schemas.aggregates import AggregateRecord, encode_aggregate
from schemas.registry import Registration
from stream_jobs import session_state
from stream_jobs.expiry import QuietSweep, forget_quiet, sweep_interval_s
from stream_jobs.faust_fixes import exit_on_error, put_durably
from stream_jobs.session_state import VehicleState
from stream_jobs.sessions import SessionConfig, advance, flush, forget_owner, ingest, new_state
from vtp.core import headers as h
from vtp.core import metrics
from vtp.core.headers import deadletter_headers
from vtp.core.settings import Settings


def changelog_configs(settings: Settings) -> dict[str, str]:
    """Kafka compacts a table's changelog within this lag, so a value the worker replaced
    (an erased owner's state, a forgotten vehicle's) is gone from Kafka within it."""
    return {"max.compaction.lag.ms": str(int(settings.changelog_compaction_lag_s * 1000))}


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


def _raw_position(message) -> tuple[str, int]:
    """Where the upload first reached Kafka (vtp-source, "topic:partition:offset").

    After a worker restart the validate agent routes a stretch of raw uploads again, so
    the same upload can reach aggregation at two validated offsets; by its raw position
    the second copy is a replay, skipped, rather than a late arrival."""
    source = h.header(_headers(message), h.SOURCE)
    if source:
        topic_partition, _, offset = source.rpartition(":")
        if topic_partition and offset.isdigit():
            return topic_partition, int(offset)
    return f"{message.topic}:{message.partition}", message.offset


def _received_ms(message) -> int | None:
    received = h.header(_headers(message), h.RECEIVED_MS)
    return int(received) if received and received.isdigit() else None


def _headers(message: Any) -> list[tuple[str, bytes | None]]:
    """A consumed record's headers: aiokafka gives (name, value) pairs."""
    return list(message.headers or ())


def _forget(
    state: VehicleState, headers: list[tuple[str, bytes | None]], registration: Registration | None
) -> None:
    owner = h.header(headers, h.ERASED_OWNER)
    horizon = h.header(headers, h.ERASURE_HORIZON_MS)
    if (
        owner
        and horizon
        and horizon.isdigit()
        and forget_owner(state, owner, int(horizon), registration)
    ):
        metrics.STATES_SCRUBBED.inc()


def add_aggregation(
    app: faust.App, settings: Settings, registry: Callable[[str], Registration | None]
) -> Callable[[bytes, int], Awaitable[None]]:
    """Add the agent; returns what the registry agent awaits after applying a change."""
    region = settings.need_region()
    topics = settings.topics
    states = bytes_table(app, "vehicle_sessions", settings)
    quiet_sweep = QuietSweep(sweep_interval_s(settings.vehicle_state_ttl_s))
    store = default_store()
    config = session_config(settings)

    def state_for(vin: str) -> VehicleState:
        stored = states.get(vin.encode())
        if stored:
            return session_state.from_json(stored)
        reg = registry(vin)
        return new_state(
            vin, region, reg.time_zone if reg else "UTC", reg.battery_capacity_kwh if reg else None
        )

    async def emit(vin: str, records: list[AggregateRecord], pending: list) -> None:
        for rec in records:
            metrics.AGGREGATE_RECORDS.labels(region, rec["kind"], str(rec["final"])).inc()
            pending.append(
                await app.producer.send(
                    topics.aggregates, vin.encode(), encode_aggregate(rec, store), None, None, None
                )
            )

    async def aggregate_sessions(stream: faust.Stream[Any]) -> None:
        async for events in stream.take_events(1000, within=0.2):
            touched: dict[str, VehicleState] = {}
            ended: set[str] = set()  # vehicles whose registration changed
            partition_of: dict[str, int] = {}
            pending = []
            for event in events:
                message = event.message
                control = h.header(_headers(message), h.CONTROL)
                if control is not None:
                    vin = (message.key or b"").decode(errors="replace")
                    if states.get(message.key or b"") is None and vin not in touched:
                        continue  # nothing aggregated for it here
                    state = touched[vin] = touched.get(vin) or state_for(vin)
                    partition_of[vin] = message.partition
                    if control == h.REGISTRY_CONTROL.decode():
                        ended.add(vin)
                    elif control == h.ERASURE_CONTROL.decode():
                        _forget(state, _headers(message), registry(vin))
                    continue
                try:
                    record, _ = store.decode(message.value or b"")
                except FramingError:
                    continue  # the sink dead-letters undecodable messages; nothing to aggregate
                if h.header(_headers(message), h.REGION) != region:
                    continue  # the sink refuses it too
                vin = record["vin"]
                state = touched.get(vin) or state_for(vin)
                touched[vin] = state
                partition_of[vin] = message.partition
                result = ingest(
                    state,
                    record,
                    config,
                    registry(vin),
                    _raw_position(message),
                    _received_ms(message),
                )
                if result.too_late:
                    metrics.AGGREGATE_TOO_LATE.labels(region).inc(len(result.too_late))
                    detail = f"{len(result.too_late)} samples older than the released time; seq {result.too_late[:20]}"
                    source = (
                        h.header(_headers(message), h.SOURCE)
                        or f"{message.topic}:{message.partition}:{message.offset}"
                    )
                    pending.append(
                        await app.producer.send(
                            topics.deadletter,
                            message.key,
                            message.value,
                            None,
                            None,
                            deadletter_headers("aggregate", "too_late", detail, source),
                        )
                    )
            for vin, state in touched.items():
                await emit(vin, advance(state, config, registry(vin), vin in ended), pending)
            await asyncio.gather(*pending)
            await asyncio.gather(
                *(
                    put_durably(
                        states,
                        vin.encode(),
                        session_state.to_json(state),
                        partition_of[vin],
                    )
                    for vin, state in touched.items()
                )
            )
            await forget_quiet_vehicles(set(touched))

    async def close_quiet(key: bytes, value: bytes) -> None:
        state = session_state.from_json(value)
        pending: list = []
        await emit(state.vin, flush(state, config, registry(state.vin)), pending)
        await asyncio.gather(*pending)

    async def forget_quiet_vehicles(busy: set[str]) -> None:
        await forget_quiet(
            states,
            quiet_sweep,
            ttl_ms=int(settings.vehicle_state_ttl_s * 1000),
            partitions=settings.topic_partitions,
            assigned={
                tp.partition for tp in app.consumer.assignment() if tp.topic == topics.validated
            },
            busy={vin.encode() for vin in busy},
            touched_of=session_state.touched_of,
            closing=close_quiet,
        )

    app.agent(app.topic(topics.validated, **RAW_TOPIC), name="aggregate")(
        exit_on_error(aggregate_sessions)
    )

    async def registration_changed(vin: bytes, revision: int) -> None:
        """Tell the agent, in order with the vehicle's uploads, to re-judge its periods."""
        if states.get(vin) is None:
            return  # nothing aggregated for it yet: its next samples find the new registry
        sent = await app.producer.send(
            topics.validated,
            vin,
            b"",
            None,
            None,
            [(h.CONTROL, h.REGISTRY_CONTROL), (h.REGISTRY_REVISION, str(revision).encode())],
        )
        await sent

    return registration_changed

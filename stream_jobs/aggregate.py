"""The aggregation agent: validated uploads -> trips, charges, daily summaries.

Per-vehicle session state lives in a changelog-backed Faust table keyed by VIN, so a
restarted worker continues where it was. Each batch ingests every upload, advances
each touched vehicle once, stores its state, and emits records (JSON, keyed by VIN)
to the region's aggregates topic. Samples that arrive after their time was released
are dead-lettered (reason too_late, stage aggregate) with the upload's bytes; the
samples themselves are still stored by the sink.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import faust

from schemas import FramingError, default_store
from stream_jobs.faust_fixes import exit_on_error, put_durably
from stream_jobs.sessions import SessionConfig, advance, ingest, new_state
from stream_jobs.validate import Registration
from vtp import metrics
from vtp.settings import Settings


def session_config(settings: Settings) -> SessionConfig:
    return SessionConfig(
        trip_gap_ms=int(settings.trip_gap_s * 1000),
        charge_gap_ms=int(settings.charge_gap_s * 1000),
        allowed_lateness_ms=int(settings.allowed_lateness_s * 1000),
    )


def _header(message, name: str) -> str | None:
    for key, value in message.headers or []:
        if key == name and value is not None:
            return value.decode(errors="replace")
    return None


def _raw_position(message) -> tuple[str, int]:
    """Where the upload first reached Kafka (vtp-source, "topic:partition:offset").

    After a worker restart the validate agent routes a stretch of raw uploads again, so
    the same upload can reach aggregation at two validated offsets; by its raw position
    the second copy is a replay, skipped, rather than a late arrival."""
    source = _header(message, "vtp-source")
    if source:
        topic_partition, _, offset = source.rpartition(":")
        if topic_partition and offset.isdigit():
            return topic_partition, int(offset)
    return f"{message.topic}:{message.partition}", message.offset


def add_aggregation(
    app: faust.App,
    settings: Settings,
    registry: Callable[[str], Registration | None],
    deadletter_headers: Callable[..., list],
) -> None:
    topics = settings.topics
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    states = app.Table(
        "vehicle_sessions", default=None, key_type=bytes, value_type=bytes, use_partitioner=True
    )
    store = default_store()
    config = session_config(settings)

    def state_for(vin: str, owner: str, region: str) -> dict:
        stored = states.get(vin.encode())
        if stored:
            return json.loads(stored)
        reg = registry(vin)
        return new_state(
            vin,
            owner,
            region,
            reg.time_zone if reg else "UTC",
            reg.battery_capacity_kwh if reg else None,
        )

    async def aggregate_sessions(stream: faust.StreamT) -> None:
        async for events in stream.take_events(1000, within=0.2):
            touched: dict[str, dict] = {}
            partition_of: dict[str, int] = {}
            pending = []
            for event in events:
                message = event.message
                try:
                    record, _ = store.decode(message.value or b"")
                except FramingError:
                    continue  # the sink dead-letters undecodable messages; nothing to aggregate
                vin = record["vin"]
                region = _header(message, "vtp-region") or ""
                if region not in settings.regions:
                    continue  # the sink refuses it too
                state = touched.get(vin) or state_for(
                    vin, _header(message, "vtp-owner") or "", region
                )
                touched[vin] = state
                partition_of[vin] = message.partition
                result = ingest(state, record, config, _raw_position(message))
                if result.too_late:
                    metrics.AGGREGATE_TOO_LATE.labels(region).inc(len(result.too_late))
                    detail = f"{len(result.too_late)} samples older than the released time; seq {result.too_late[:20]}"
                    source = (
                        _header(message, "vtp-source")
                        or f"{message.topic}:{message.partition}:{message.offset}"
                    )
                    pending.append(
                        await app.producer.send(
                            topics.deadletter, message.key, message.value, None, None,
                            deadletter_headers("aggregate", "too_late", detail, source),
                        )
                    )  # fmt: skip
            for vin, state in touched.items():
                for rec in advance(state, config):
                    metrics.AGGREGATE_RECORDS.labels(
                        state["region"], rec["kind"], str(rec["final"])
                    ).inc()
                    pending.append(
                        await app.producer.send(
                            topics.aggregates(state["region"]),
                            vin.encode(),
                            json.dumps(rec).encode(),
                            None,
                            None,
                            None,
                        )
                    )
            await asyncio.gather(*pending)
            await asyncio.gather(
                *(
                    put_durably(
                        states,
                        vin.encode(),
                        json.dumps(state, separators=(",", ":")).encode(),
                        partition_of[vin],
                    )
                    for vin, state in touched.items()
                )
            )

    # One agent per region topic, so each region's backlog is batched on its own.
    for region in settings.regions:
        app.agent(app.topic(topics.validated(region), **raw), name=f"aggregate_{region}")(
            exit_on_error(aggregate_sessions)
        )

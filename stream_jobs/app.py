"""The Faust worker of one region: validate raw uploads, check residency, route them.

The agents are thin: they turn Faust events into RawUpload values, call the pure
functions in stream_jobs.validate, and send each outcome to its topic. The raw
uploads' offsets are committed once a checkpoint of the worker's state covers them
(stream_jobs.checkpoint), so routing is at-least-once; a replayed message keeps its raw
source offset, which lets the dedup table and the sink tell a replay from a duplicate. Every topic, table and changelog is the region's own (the region is
in every name); nothing is sent anywhere else.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faust
from aiokafka.structs import RecordMetadata
from confluent_kafka import Consumer, TopicPartition
from faust.types import TP, EventT

from schemas import FramingError, default_store, envelope
from schemas.envelope import BatchedUpload
from schemas.registry import Registration, decode_registration
from stream_jobs import faust_fixes, flow_log
from stream_jobs.aggregate import RAW_TOPIC, Accepted, Sessions, bytes_table
from stream_jobs.checkpoint import Checkpoints
from stream_jobs.faust_fixes import exit_on_error, put_durably
from stream_jobs.kafka_security import worker_credentials
from stream_jobs.seen import SeenTable
from stream_jobs.validate import (
    DeadLettered,
    Limits,
    Outcome,
    Quarantined,
    RawUpload,
    Routed,
    route_batch,
)
from vtp.core import headers as h
from vtp.core import metrics
from vtp.core.headers import deadletter_headers
from vtp.core.kafka import retry_kafka
from vtp.core.settings import Settings
from vtp.core.topics import REGISTRY_TABLE, SEEN_TABLE, check_cluster_region

log = logging.getLogger("vtp.worker")

BATCH_MAX = 1000
BATCH_WITHIN_S = 0.2


@functools.lru_cache(maxsize=100_000)  # bounded: a fleet's active vehicles, not every one ever
def _registration(raw: bytes) -> Registration:
    return decode_registration(raw)


class RegistryView(Mapping[str, Registration]):
    """The vehicles table seen as VIN -> Registration, each value decoded once while it
    is in use."""

    def __init__(self, table: faust.Table):
        self._table = table

    def __getitem__(self, vin: str) -> Registration:
        raw = self._table.get(vin.encode())
        if raw is None:
            raise KeyError(vin)
        return _registration(raw)

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self._table)

    def __len__(self) -> int:
        return len(self._table)


class RegistryGate:
    """Holds upload processing until the registry agent has applied what was in the
    registry topic when the worker started, so a restart does not quarantine
    uploads of vehicles that were registered all along."""

    def __init__(self, settings: Settings, group_id: str):
        self._settings = settings
        self._group = group_id
        self._targets: dict[int, int] | None = None
        self.applied: dict[int, int] = {}
        self.waiting = False  # the validate agent is held here right now

    def reset(self) -> None:
        """A new assignment: the next wait measures the registry again."""
        self._targets = None

    def _snapshot(self) -> dict[int, int]:
        topic = self._settings.topics.vehicles
        consumer = Consumer(
            {
                "bootstrap.servers": self._settings.bootstrap(),
                "group.id": self._group,
                **self._settings.kafka_extra,
            }
        )
        try:
            meta = retry_kafka(lambda: consumer.list_topics(topic, timeout=10), "registry metadata")
            parts = sorted(meta.topics[topic].partitions) if topic in meta.topics else []
            tps = [TopicPartition(topic, p) for p in parts]
            committed = {
                tp.partition: tp.offset
                for tp in retry_kafka(
                    lambda: consumer.committed(tps, timeout=10), "registry committed offsets"
                )
            }
            targets = {}
            for tp in tps:
                _, high = retry_kafka(
                    functools.partial(consumer.get_watermark_offsets, tp, timeout=10),
                    "registry watermarks",
                )
                if committed.get(tp.partition, -1) < high:
                    targets[tp.partition] = high
            return targets
        finally:
            consumer.close()

    def is_ready(self, partition: int) -> bool:
        assert self._targets is not None
        target = self._targets.get(partition)
        return target is None or self.applied.get(partition, -1) + 1 >= target

    async def wait(self, partitions: set[int]) -> None:
        if self._targets is None:
            self._targets = await asyncio.to_thread(self._snapshot)
            log.info("registry catch-up targets: %s", self._targets or "none")
        waited = 0.0
        self.waiting = True
        try:
            while not all(self.is_ready(p) for p in partitions):
                await asyncio.sleep(0.05)
                waited += 0.05
                if waited % 10 < 0.05:
                    log.info("waiting for the vehicle registry to catch up (%.0f s)", waited)
        finally:
            self.waiting = False


def create_app(settings: Settings) -> tuple[faust.App, RegistryGate]:
    """The worker's Faust app, and its registry gate (the stall watchdog asks it)."""
    faust_fixes.install()
    region = settings.need_region()
    topics = settings.topics
    faust_fixes.refuse_gaps_on(topics.uploads, topics.control)
    app_id = topics.worker_app
    app = faust.App(
        app_id,
        broker=f"kafka://{settings.bootstrap()}",
        broker_credentials=worker_credentials(settings.kafka_extra),
        store="memory://",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # The worker's outputs are uploads and states, which compress 2-4x: fewer bytes
        # for the broker to write and the sink to read (the SDK's producer uses lz4 too).
        producer_compression_type="lz4",
        # A killed worker's partitions move to a live one after this, not after 60 s.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        web_enabled=False,
        datadir=str(_made(settings.home / "faust" / app_id)),
    )
    uploads_topic = app.topic(topics.uploads, **RAW_TOPIC)
    registry_topic = app.topic(topics.vehicles, **RAW_TOPIC)
    deadletter = app.topic(topics.deadletter, **RAW_TOPIC)

    # Both tables are keyed by VIN, as are both source topics (same partition count,
    # murmur2 partitioner), so a worker holds the registry entries and the dedup
    # state of exactly the vehicles whose uploads it is assigned.
    vehicles = bytes_table(app, REGISTRY_TABLE, settings, use_partitioner=False)
    seen = SeenTable(bytes_table(app, SEEN_TABLE, settings), settings)
    registry = RegistryView(vehicles)
    gate = RegistryGate(settings, app_id)
    store = default_store()
    limits = Limits(
        max_clock_skew_ms=int(settings.max_clock_skew_s * 1000),
        max_backlog_ms=int(settings.max_backlog_s * 1000),
        region=region,
        dedup_per_vehicle=settings.dedup_uploads_per_vehicle,
        max_upload_bytes=settings.max_upload_bytes,
        max_samples=settings.max_samples_per_upload,
    )

    async def send(
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        partition: int | None = None,
    ) -> Awaitable[RecordMetadata]:
        # Straight to the producer: Faust's topic.send costs ~0.2 ms a message.
        return await app.producer.send(topic, key, value, partition, None, headers)

    sessions = Sessions(app, settings, registry.get, send)
    sessions.add_notice_agent(app, BATCH_MAX, BATCH_WITHIN_S)

    def assigned_uploads() -> set[int]:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == topics.uploads}

    async def write_checkpoint() -> None:
        await asyncio.gather(sessions.write(), seen.write())
        await sessions.forget_quiet()
        await seen.forget_quiet(assigned_uploads())

    checkpoints = Checkpoints(settings.state_checkpoint_s, write_checkpoint)
    faust_fixes.commit_below(topics.uploads, checkpoints.limit)

    def forget_what_memory_holds() -> None:
        sessions.forget_decoded()
        seen.forget()
        checkpoints.forget()

    # Under the lock: a checkpoint the timer is writing finishes first (Faust waits for
    # the agents' batches, not for timers), and its limits then count for nothing.
    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # signal= comes in **_
    async def measure_the_registry_again(app: faust.App, assigned: set[TP], **_: Any) -> None:
        gate.reset()  # partitions it had no target for may be assigned now
        async with sessions.lock:
            forget_what_memory_holds()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # signal= comes in **_
    async def drop_decoded_states(app: faust.App, revoked: set[TP], **_: Any) -> None:
        metrics.forget_lag(app_id, [(tp.topic, tp.partition) for tp in revoked])
        async with sessions.lock:
            forget_what_memory_holds()

    @app.timer(interval=max(0.1, min(1.0, settings.state_checkpoint_s)))
    @exit_on_error
    async def checkpoint_when_due() -> None:
        # Between batches too, so a stream's last uploads get committed when no more come:
        # at once, not at Faust's next periodic commit (up to 2.8 s later).
        if checkpoints.due():
            async with sessions.lock:
                await checkpoints.run()
            await app.consumer.commit()

    @app.agent(registry_topic)
    @exit_on_error
    async def apply_registrations(stream: faust.Stream[Any]) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            writes, changed, letters = [], [], []
            for event in events:
                message = event.message
                key = message.key
                # The registry topic is compacted (create_topics checks), and a compacted
                # topic's broker refuses a record without a key.
                assert key is not None
                if message.value is None:  # tombstone: the vehicle left the registry
                    writes.append(put_durably(vehicles, key, None, message.partition))
                    changed.append((key, 0))
                    continue
                try:
                    registration = decode_registration(message.value, store)
                except FramingError as exc:
                    source = f"{message.topic}:{message.partition}:{message.offset}"
                    value, more = h.kept(message.value, settings.max_upload_bytes)
                    headers = deadletter_headers("registry", exc.reason, exc.detail, source)
                    letters.append(
                        await app.producer.send(
                            deadletter.get_topic_name(),
                            key[: h.KEEP_BYTES],
                            value,
                            None,
                            None,
                            headers + more,
                        )
                    )
                    metrics.DEADLETTERED.labels("registry", exc.reason).inc()
                    continue
                writes.append(put_durably(vehicles, key, message.value, message.partition))
                changed.append((key, registration.revision))
                metrics.REGISTRY_UPDATES.inc()
            # Durable before the batch is acked, as every other table write: a registration
            # whose offset is committed is never missing after a crash.
            await asyncio.gather(*writes, *letters)
            await sessions.registration_changed(changed)
            for event in events:
                gate.applied[event.message.partition] = max(
                    gate.applied.get(event.message.partition, -1), event.message.offset
                )

    @app.agent(uploads_topic)
    @exit_on_error
    async def validate_uploads(stream: faust.Stream[Any]) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            await gate.wait({e.message.partition for e in events})
            raws = [
                RawUpload(
                    value=e.message.value or b"",
                    key=e.message.key,
                    partition=e.message.partition,
                    offset=e.message.offset,
                    timestamp_ms=int(e.message.timestamp * 1000),
                )
                for e in events
            ]
            metrics.UPLOADS_IN.inc(len(raws))
            async with sessions.lock:  # the seen ids too are written at checkpoints
                outcomes = route_batch(raws, store, registry, seen.uploads, limits)
                seen.heard(
                    [r for r, o in zip(raws, outcomes, strict=True) if isinstance(o, Routed)]
                )
                # The batch's offsets are committed at the first checkpoint after every
                # routed copy, aggregate record and dead letter of it is acknowledged.
                pending = [
                    await _send(raw_upload, outcome)
                    for raw_upload, outcome in zip(raws, outcomes, strict=True)
                    if not isinstance(outcome, Routed)
                ]
                pending += await _send_routed(raws, outcomes)
                accepted = [
                    Accepted(r.key, r.value, o.record, r.partition, r.offset, r.timestamp_ms)
                    for r, o in zip(raws, outcomes, strict=True)
                    if isinstance(o, Routed) and r.key
                ]
                await sessions.take(accepted, pending)
                await asyncio.gather(*pending)
                last = _last_offsets(events)
                checkpoints.processed(last)
                if checkpoints.due():
                    await checkpoints.run()
            _report_batch_lag(last)

    async def _send_routed(
        raws: list[RawUpload], outcomes: list[Outcome]
    ) -> list[Awaitable[RecordMetadata]]:
        """The batch's routed uploads to the validated topic: per source partition, one
        message per run of one writer schema (schemas.envelope)."""
        by_partition: dict[int, list[BatchedUpload]] = {}
        for r, o in zip(raws, outcomes, strict=True):
            if isinstance(o, Routed) and r.key:
                metrics.UPLOADS_ROUTED.labels(o.region).inc()
                metrics.SAMPLES_ROUTED.labels(o.region).inc(o.samples)
                by_partition.setdefault(r.partition, []).append(
                    BatchedUpload(r.value, r.key, r.offset, r.timestamp_ms, o.registry_revision)
                )
        sent = []
        for partition, uploads in by_partition.items():
            for run in envelope.cut(uploads):
                writer = store.writer_schema(run[0].value)
                value, sidecar = envelope.pack(f"{topics.uploads}:{partition}", writer, run)
                headers = [(h.REGION, region.encode()), (envelope.BATCH_HEADER, sidecar)]
                sent.append(await send(topics.validated, None, value, headers, partition))
        return sent

    async def _send(raw_upload: RawUpload, outcome: Outcome) -> Awaitable[RecordMetadata]:
        source = f"{topics.uploads}:{raw_upload.source}"
        if isinstance(outcome, Quarantined):
            topic = topics.quarantine
            headers = deadletter_headers("validate", outcome.reason, outcome.detail, source)
            metrics.QUARANTINED.labels(outcome.reason).inc()
        else:
            assert isinstance(outcome, DeadLettered)
            topic = topics.deadletter
            headers = deadletter_headers("validate", outcome.reason, outcome.detail, source)
            metrics.DEADLETTERED.labels("validate", outcome.reason).inc()
        # A message the broker took may be larger than this producer sends (aiokafka's
        # limit counts headers too): its dead letter keeps the start and says so.
        value, more = h.kept(raw_upload.value, settings.max_upload_bytes)
        key = raw_upload.key[: h.KEEP_BYTES] if raw_upload.key else raw_upload.key
        return await send(topic, key, value, headers + more)

    def _report_batch_lag(last: dict[int, int]) -> None:
        for partition, offset in last.items():
            high = app.consumer.highwater(TP(topics.uploads, partition))
            if high is not None and high >= 0:
                metrics.CONSUMER_LAG.labels(app_id, topics.uploads, str(partition)).set(
                    max(0, high - offset - 1)
                )

    @app.timer(interval=5.0)
    async def report_lag() -> None:
        for tp in app.consumer.assignment():
            if tp.topic not in (topics.uploads, topics.vehicles):
                continue
            position = await app.consumer.position(TP(tp.topic, tp.partition))
            if position is None:
                continue
            lag = max(0, app.consumer.highwater(tp) - position)
            metrics.CONSUMER_LAG.labels(app_id, tp.topic, str(tp.partition)).set(lag)

    return app, gate


def _last_offsets(events: Sequence[EventT[Any]]) -> dict[int, int]:
    """Partition -> the last offset of a batch's events there."""
    last: dict[int, int] = {}
    for e in events:
        last[e.message.partition] = max(last.get(e.message.partition, -1), e.message.offset)
    return last


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """`vtp worker`: run the validate job until SIGTERM/SIGINT."""
    check_cluster_region(settings)
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    app, gate = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel)

    @app.task
    async def diagnose_on_sigusr1() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, flow_log.log_flow_state, app)

    watch = faust_fixes.StallWatch(settings.worker_stall_s)
    registry_progress = {"applied": -1}

    @app.timer(interval=10.0)
    async def restart_if_stalled() -> None:
        consumer = faust_fixes.internals(app.consumer)
        if not consumer.flow_active or settings.worker_stall_s <= 0:
            watch.since.clear()
            return
        applied = sum(gate.applied.values())
        if gate.waiting and applied != registry_progress["applied"]:
            # Uploads wait for a registry that is still catching up: that is progress.
            registry_progress["applied"] = applied
            watch.since.clear()
            return
        registry_progress["applied"] = applied
        progress = {
            tp: (
                consumer._read_offset[tp],
                consumer._committed_offset[tp],
                consumer.highwater(tp),
                len(consumer._acked[tp]),
            )
            for tp in consumer.assignment()
            if tp.topic not in app.tables.changelog_topics
        }
        stuck = watch.stalled(progress, time.monotonic())
        if stuck:
            flow_log.log_flow_state(app)
            log.critical(
                "no record read or committed for %.0f s on %s although work is outstanding; "
                "exiting for the supervisor to restart the worker",
                settings.worker_stall_s,
                sorted(f"{tp.topic}:{tp.partition}" for tp in stuck),
            )
            faust_fixes.exit_for_restart()

    worker.execute_from_commandline()


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path

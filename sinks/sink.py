"""`vtp sink --region R`: the region's validated topic into its warehouse.

Per batch (one topic-partition, a contiguous offset range):
  1. record the range in sink_batches (unless it is a replay of a recorded range),
  2. refuse what may not be stored here (residency, untagged, undecodable) and
     resends of uploads already stored -> dead-letter topic, with the original bytes,
  3. insert samples, then uploads, each with the token topic-partition-first-last,
  4. wait for the dead-letter topic to acknowledge, then commit offset last+1.
A crash anywhere replays the range with the same token: no loss, no duplicate.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from schemas import FramingError, default_store
from sinks import rows as rowlib
from sinks.aggregate_rows import aggregate_tables
from sinks.batching import Batcher, PartitionBatch
from sinks.erased import drop_erased_samples, keep_aggregate
from sinks.migrations import migrate
from sinks.warehouse import Warehouse, open_warehouse, rows
from stream_jobs.app import deadletter_headers
from vtp import metrics
from vtp.settings import Settings

log = logging.getLogger("vtp.sink")


class SinkError(RuntimeError):
    """The sink cannot go on without losing data; it stops without committing."""


@dataclass(frozen=True)
class Refused:
    message: Message
    reason: str
    detail: str
    source: str


@dataclass(frozen=True)
class Sorted:
    fresh: list[rowlib.StoredUpload]
    refused: list[Refused]
    replays_skipped: int


def _header(message: Message, name: str) -> str | None:
    for key, value in message.headers() or []:
        if key == name and value is not None:
            return value.decode(errors="replace")
    return None


def classify(
    messages: list[Message], region: str
) -> tuple[list[rowlib.StoredUpload], list[Refused]]:
    """Decode what may be stored in ``region``; refuse the rest with a reason."""
    store = default_store()
    good, refused = [], []
    for m in messages:
        source = _header(m, "vtp-source") or f"{m.topic()}:{m.partition()}:{m.offset()}"
        tag = _header(m, "vtp-region")
        owner = _header(m, "vtp-owner")
        if tag is None or owner is None:
            refused.append(Refused(m, "untagged", "no vtp-region/vtp-owner header", source))
            continue
        if tag != region:
            refused.append(
                Refused(
                    m,
                    "residency_mismatch",
                    f"tagged {tag!r}, refused by the {region!r} sink",
                    source,
                )
            )
            continue
        try:
            record, writer = store.decode(m.value() or b"")
        except FramingError as exc:
            refused.append(Refused(m, exc.reason, exc.detail, source))
            continue
        good.append(
            rowlib.StoredUpload(
                record=record,
                owner_id=owner,
                region=region,
                schema_version=writer.version,
                received_ms=int(_header(m, "vtp-received-ms") or m.timestamp()[1]),
                raw_source=source,
                topic=m.topic(),
                partition=m.partition(),
                offset=m.offset(),
            )
        )
    return good, refused


def sort_against_stored(
    uploads: list[rowlib.StoredUpload], stored: dict[str, tuple[str, str, int, int]]
) -> tuple[list[rowlib.StoredUpload], list[rowlib.StoredUpload], int]:
    """Split uploads into (to insert, resends to refuse, worker replays skipped).

    ``stored`` maps upload_id -> (raw_source, topic, partition, offset) of the copy
    already in the warehouse. The same validated message again is a sink replay and is
    inserted again (its token makes that a no-op); the same raw message at another
    validated offset is a worker replay, skipped; another raw message with a stored
    upload id is a resend, refused as duplicate_upload.
    """
    seen = dict(stored)
    fresh, resends, skipped = [], [], 0
    for up in uploads:
        uid = up.record["upload_id"]
        prior = seen.get(uid)
        here = (up.raw_source, up.topic, up.partition, up.offset)
        if prior is None or prior[1:] == here[1:]:
            fresh.append(up)
            seen.setdefault(uid, here)
        elif prior[0] == up.raw_source:
            skipped += 1
        else:
            resends.append(up)
    return fresh, resends, skipped


class RegionSink:
    def __init__(self, settings: Settings, region: str, warehouse: Warehouse | None = None):
        if region not in settings.regions:
            raise SinkError(
                f"region {region!r} is not one of VTP_REGIONS={','.join(settings.regions)}"
            )
        self.settings = settings
        self.region = region
        self.topic = settings.topics.validated(region)
        self.aggregates_topic = settings.topics.aggregates(region)
        self.warehouse = warehouse or open_warehouse(settings, region)
        migrate(self.warehouse)
        bootstrap = settings.bootstrap()
        self.group = f"{settings.topic_prefix}-sink-{region}"
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": self.group,
                # Static membership: a restarted sink takes its partitions back at once
                # instead of waiting out the dead member's session timeout.
                "group.instance.id": f"{self.group}-{settings.sink_instance}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                **settings.kafka_extra,
            }
        )
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, **settings.kafka_extra}
        )
        self.batcher = Batcher(
            settings.sink_batch_messages, settings.sink_flush_ms / 1000, self._recorded_end
        )
        self._stop = False
        self._last_lag_report = 0.0
        self.stored_uploads = 0
        # Held while a batch is written; an erasure in the same process takes it so no
        # batch that was filtered before the erasure lands after its deletes.
        self.write_lock = threading.RLock()

    # -- Kafka side -------------------------------------------------------------
    def stop(self, *_: object) -> None:
        self._stop = True

    def run(self, should_stop: Callable[[], bool] | None = None) -> None:
        self.consumer.subscribe([self.topic, self.aggregates_topic], on_revoke=self._on_revoke)
        log.info("sink %s: %s -> %s", self.region, self.topic, self.warehouse.description)
        try:
            while not self._stop and not (should_stop and should_stop()):
                messages = self.consumer.consume(num_messages=5000, timeout=0.2)
                now = time.monotonic()
                for m in messages:
                    err = m.error()
                    if err is not None:
                        if err.fatal():
                            raise SinkError(f"Kafka consumer failed: {err}")
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer: %s", err)
                        continue
                    self.batcher.add(m.topic(), m.partition(), m.offset(), m, now)
                for batch in self.batcher.take_ready(now):
                    self._write(batch)
                self._report_lag(now)
            for batch in self.batcher.take_ready(time.monotonic(), final=True):
                self._write(batch)
        finally:
            self.consumer.close()
            self.producer.flush(10)
            self.warehouse.close()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for topic in (self.topic, self.aggregates_topic):
            self.batcher.drop(topic, [tp.partition for tp in partitions if tp.topic == topic])

    def _report_lag(self, now: float) -> None:
        if now - self._last_lag_report < 5:
            return
        assigned = self.consumer.assignment()
        for tp in self.consumer.position(assigned) if assigned else []:
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset >= 0 and high >= 0:
                metrics.CONSUMER_LAG.labels(self.group, tp.topic, str(tp.partition)).set(
                    max(0, high - tp.offset)
                )
                # Until a position is known (right after start) it tries again next loop.
                self._last_lag_report = now

    # -- warehouse side ---------------------------------------------------------
    def _recorded_end(self, topic: str, partition: int, first_offset: int) -> int | None:
        found = rows(
            self.warehouse.query(
                "SELECT last_offset FROM sink_batches WHERE topic = {t:String} "
                "AND partition = {p:UInt32} AND first_offset = {f:UInt64} "
                "ORDER BY recorded_at DESC LIMIT 1",
                {"t": topic, "p": partition, "f": first_offset},
            )
        )
        if found:
            log.info(
                "replaying recorded batch %s-%s-%s..%s", topic, partition, first_offset, found[0][0]
            )
        return found[0][0] if found else None

    def _stored(self, uploads: list[rowlib.StoredUpload]) -> dict[str, tuple[str, str, int, int]]:
        if not uploads:
            return {}
        result = self.warehouse.query(
            "SELECT upload_id, raw_source, topic, partition, offset FROM uploads "
            "WHERE owner_id IN {owners:Array(String)} AND vin IN {vins:Array(String)} "
            "AND upload_id IN {ids:Array(String)}",
            {
                "owners": sorted({u.owner_id for u in uploads}),
                "vins": sorted({u.record["vin"] for u in uploads}),
                "ids": [u.record["upload_id"] for u in uploads],
            },
        )
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows(result)}

    def _write(self, batch: PartitionBatch) -> None:
        with self.write_lock:
            self._write_locked(batch)

    def _erasure_horizons(self) -> dict[str, int]:
        found = self.warehouse.query(
            "SELECT owner_id, toUnixTimestamp64Milli(max(requested_at)) FROM erasures "
            "GROUP BY owner_id"
        )
        return {owner: int(ms) for owner, ms in rows(found)}

    def _write_locked(self, batch: PartitionBatch) -> None:
        started = time.perf_counter()
        horizons = self._erasure_horizons()  # a small table; read per batch, never stale
        if batch.forced_last is None:
            self.warehouse.execute(
                "INSERT INTO sink_batches (topic, partition, first_offset, last_offset, messages) "
                "VALUES ({t:String}, {p:UInt32}, {f:UInt64}, {l:UInt64}, {n:UInt32})",
                {"t": batch.topic, "p": batch.partition, "f": batch.first_offset,
                 "l": batch.last_offset, "n": len(batch)},
            )  # fmt: skip
        if batch.topic == self.aggregates_topic:
            refused = self._insert_aggregates(batch, horizons)
        else:
            refused = self._insert_uploads(batch, horizons)
        for r in refused:
            self.producer.produce(
                self.settings.topics.deadletter,
                key=r.message.key(),
                value=r.message.value(),
                headers=deadletter_headers("sink", r.reason, r.detail, r.source),
            )
            metrics.DEADLETTERED.labels("sink", r.reason).inc()
        if refused and self.producer.flush(30) > 0:
            raise SinkError("the dead-letter topic did not acknowledge within 30 s; not committing")
        self.consumer.commit(
            offsets=[TopicPartition(batch.topic, batch.partition, batch.last_offset + 1)],
            asynchronous=False,
        )
        metrics.SINK_BATCH_MESSAGES.labels(self.region).observe(len(batch))
        metrics.SINK_INSERT_SECONDS.labels(self.region).observe(time.perf_counter() - started)

    def _insert_uploads(self, batch: PartitionBatch, horizons: dict[str, int]) -> list[Refused]:
        good, refused = classify(batch.items, self.region)
        good, erased = drop_erased_samples(good, horizons)
        metrics.SINK_ERASED_DROPPED.labels(self.region, "sample").inc(erased)
        fresh, resends, skipped = sort_against_stored(good, self._stored(good))
        refused += [
            Refused(self._message_of(batch, up), "duplicate_upload",
                    f"upload {up.record['upload_id']} is already stored", up.raw_source)
            for up in resends
        ]  # fmt: skip
        samples = rowlib.samples_table(fresh)
        self.warehouse.insert_arrow("samples", samples, batch.token)
        self.warehouse.insert_arrow("uploads", rowlib.uploads_table(fresh), batch.token)
        self.stored_uploads += len(fresh)
        metrics.SINK_UPLOADS.labels(self.region).inc(len(fresh))
        metrics.SINK_SAMPLES.labels(self.region).inc(samples.num_rows)
        metrics.SINK_REPLAYS_SKIPPED.labels(self.region).inc(skipped)
        return refused

    def _insert_aggregates(self, batch: PartitionBatch, horizons: dict[str, int]) -> list[Refused]:
        records, refused = [], []
        for m in batch.items:
            source = f"{m.topic()}:{m.partition()}:{m.offset()}"
            try:
                record = json.loads(m.value() or b"")
                kind = record["kind"]
            except (ValueError, TypeError, KeyError) as exc:
                refused.append(
                    Refused(m, "malformed_aggregate", f"{type(exc).__name__}: {exc}", source)
                )
                continue
            if record.get("region") != self.region:
                refused.append(
                    Refused(
                        m,
                        "residency_mismatch",
                        f"{kind} of region {record.get('region')!r}",
                        source,
                    )
                )
                continue
            if not keep_aggregate(record, horizons):
                metrics.SINK_ERASED_DROPPED.labels(self.region, kind).inc()
                continue
            records.append(record)
        try:
            tables = aggregate_tables(records)
        except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
            raise SinkError(
                f"aggregate records of {batch.token} do not fit their tables: {exc}"
            ) from None
        for table, data in sorted(tables.items()):
            self.warehouse.insert_arrow(table, data, batch.token)
        return refused

    @staticmethod
    def _message_of(batch: PartitionBatch, up: rowlib.StoredUpload) -> Message:
        return batch.items[batch.offsets.index(up.offset)]


def run_sink(settings: Settings, region: str) -> None:
    """`vtp sink --region R`, until SIGTERM/SIGINT (which finish the current batch)."""
    metrics.serve_metrics(settings.metrics_port)
    sink = RegionSink(settings, region)
    signal.signal(signal.SIGTERM, sink.stop)
    signal.signal(signal.SIGINT, sink.stop)
    sink.run()

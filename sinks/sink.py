"""`vtp sink`: the region's validated topic into its warehouse.

Per batch (one topic-partition, a contiguous offset range):
  1. record the range in sink_batches (unless it is a replay of a recorded range),
  2. check residency itself, against its own copy of the region's registry: every
     sample is stored under the owner registered here at its event time; samples of
     no period registered here are quarantined, never stored,
  3. refuse what may not be stored (untagged, tagged for another region, undecodable)
     and resends of uploads already stored -> dead-letter topic, with the original bytes,
  4. insert samples, then uploads, each with the token topic-partition-first-last,
  5. wait for the dead-letter and quarantine topics to acknowledge, then commit last+1.
A crash anywhere replays the range with the same token: no loss, no duplicate.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from schemas import default_store
from schemas.aggregates import decode_aggregate
from schemas.codec import HEADER_LEN
from sinks import rows as rowlib
from sinks.aggregate_rows import aggregate_tables
from sinks.batching import Batcher, PartitionBatch
from sinks.classify import Refused, StoredCopies, header, judge, screen, sort_against_stored, source
from sinks.columnar import (
    NEWEST,
    Plain,
    SampleRows,
    facts_container,
    facts_match,
    plain_candidates,
    plain_uploads_table,
    still_plain,
    written_with_newest,
)
from sinks.erased import drop_erased_samples, held_by_owner, keep_aggregate
from sinks.migrations import MigrationOptions
from sinks.store import SinkStore, WarehouseSinkStore
from sinks.unbatch import expand, uploads_in
from vtp.core import headers as h
from vtp.core import metrics
from vtp.core.headers import deadletter_headers
from vtp.core.kafka import coordinates, retry_kafka
from vtp.core.keys import pseudonym_key
from vtp.core.registry_copy import RegistryCopy, RegistryUnavailable
from vtp.core.settings import Settings
from vtp.core.topics import check_cluster_region
from vtp.core.warehouse import Warehouse, WarehouseError, open_warehouse

log = logging.getLogger("vtp.sink")


class SinkError(RuntimeError):
    """The sink cannot go on without losing data; it stops without committing."""


# (owner, vin) pairs the sink remembers having pseudonyms for (~250 bytes each).
PSEUDONYMIZED_REMEMBERED = 100_000

# A batch whose insert fails is tried again this many times, with these pauses: a
# warehouse that is busy, merging or restarting is not a reason to stop.
WRITE_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0)


class RegionSink:
    """The sink of one region. Its Kafka consumer and producer, its registry copy and its
    store are made from the settings unless handed in (tests hand in doubles)."""

    def __init__(
        self,
        settings: Settings,
        warehouse: Warehouse | None = None,
        write_lock: threading.RLock | None = None,
        *,
        store: SinkStore | None = None,
        consumer: Consumer | None = None,
        producer: Producer | None = None,
        registry: RegistryCopy | None = None,
    ):
        self.settings = settings
        self.region = settings.need_region()
        self.topic = settings.topics.validated
        self.aggregates_topic = settings.topics.aggregates
        if consumer is None:
            check_cluster_region(settings)
        if store is None:
            store = WarehouseSinkStore(
                warehouse or open_warehouse(settings),
                pseudonym_key(settings),
                warehouse is None,
                MigrationOptions.from_settings(settings),
            )
        self.store = store
        self.store.prepare()
        self.group = settings.topics.sink_group
        self.registry = registry if registry is not None else RegistryCopy(settings)
        self.consumer = consumer or Consumer(
            {
                "bootstrap.servers": settings.bootstrap(),
                "group.id": self.group,
                # Static membership: a restarted sink takes its partitions back at once
                # instead of waiting out the dead member's session timeout.
                "group.instance.id": f"{self.group}-{settings.sink_instance}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                **settings.kafka_extra,
            }
        )
        self.producer = producer or Producer(
            {
                "bootstrap.servers": settings.bootstrap(),
                "enable.idempotence": True,
                **settings.kafka_extra,
            }
        )
        # Aggregate records are not on an upload's way to the warehouse: their batches
        # wait longer, so each costs its statements over more records.
        self.batcher: Batcher[Message] = Batcher(
            settings.sink_batch_messages,
            settings.sink_flush_ms / 1000,
            self._recorded_end,
            {self.aggregates_topic: settings.sink_aggregates_flush_ms / 1000},
        )
        self._recorded: dict[tuple[str, int], dict[int, int]] = {}
        self._pseudonymized: set[tuple[str, str]] = set()
        self._stop = False
        self._last_lag_report = 0.0
        self.stored_uploads = 0
        self._schemas = default_store()
        # Held while a batch is written; an erasure in the same process takes it so no
        # batch that was filtered before the erasure lands after its deletes.
        self.write_lock = write_lock or threading.RLock()

    # -- Kafka side -------------------------------------------------------------
    def stop(self, *_: object) -> None:
        self._stop = True

    def run(self, should_stop: Callable[[], bool] | None = None) -> None:
        self.registry.start()
        self.consumer.subscribe([self.topic, self.aggregates_topic], on_revoke=self._on_revoke)
        log.info("sink %s: %s -> %s", self.region, self.topic, self.store.description)
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
                    topic, partition, offset = coordinates(m)
                    weight = uploads_in(m) if topic == self.topic else 1
                    self.batcher.add(topic, partition, offset, m, now, weight)
                self.registry.refresh()
                self._write_all(self.batcher.take_ready(now))
                self._report_lag(now)
            self._write_all(self.batcher.take_ready(time.monotonic(), final=True))
        finally:
            self.consumer.close()
            self.registry.close()
            self.producer.flush(10)
            self.store.close()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        metrics.forget_lag(self.group, [(tp.topic, tp.partition) for tp in partitions])
        for tp in partitions:
            self._recorded.pop((tp.topic, tp.partition), None)
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
        # Read once per partition and assignment: only a process that held the partition
        # before (and crashed) can have recorded a range this one has not cut itself.
        ranges = self._recorded.get((topic, partition))
        if ranges is None:
            ranges = self.store.recorded_ranges(topic, partition, first_offset)
            self._recorded[(topic, partition)] = ranges
        end = ranges.get(first_offset)
        if end is not None:
            log.info("replaying recorded batch %s-%s-%s..%s", topic, partition, first_offset, end)
        return end

    def _stored(self, uploads: list[tuple[str, str, str]]) -> StoredCopies:
        """Stored copies of these (owner, vin, upload id)."""
        if not uploads:
            return {}
        owners, vins, ids = zip(*uploads, strict=True)
        return self.store.stored_copies(sorted(set(owners)), sorted(set(vins)), list(ids))

    def _write_all(self, ready: list[PartitionBatch[Message]]) -> None:
        """The upload batches of every ready partition as one round (its reads, batch log
        rows and commit shared), then the aggregates' batches one by one."""
        uploads = [b for b in ready if b.topic == self.topic]
        if uploads:
            self._write(uploads)
        for batch in ready:
            if batch.topic != self.topic:
                self._write([batch])

    def _write(self, batches: list[PartitionBatch[Message]]) -> None:
        """Write a round of batches, trying again through warehouse errors: every step is
        idempotent (deduplication tokens, replayed dead letters are known by their source)."""
        for attempt, pause in enumerate((*WRITE_RETRIES, None), start=1):
            try:
                with self.write_lock:
                    self._write_locked(batches)
                return
            except WarehouseError as exc:
                metrics.SINK_WRITE_FAILURES.labels(self.region).inc()
                if pause is None:
                    raise
                log.warning(
                    "batches %s: %s; trying again in %.1f s (attempt %d)",
                    ", ".join(b.token for b in batches)[:200],
                    str(exc).splitlines()[0][:200],
                    pause,
                    attempt,
                )
                time.sleep(pause)

    def _record_pseudonyms(self, pairs: set[tuple[str, str]], horizons: dict[str, int]) -> None:
        """Pseudonyms for the pairs not recorded by this process before. An owner who erased
        lost them with their rows (their horizon says so): theirs are asked for again."""
        new = {pair for pair in pairs if pair not in self._pseudonymized or pair[0] in horizons}
        if new:
            self.store.record_pseudonyms(new)
        if len(self._pseudonymized) > PSEUDONYMIZED_REMEMBERED:
            self._pseudonymized.clear()
        self._pseudonymized |= pairs

    def _erasure_horizons(self, owners: set[str]) -> dict[str, int]:
        return self.store.erasure_horizons(sorted(owners)) if owners else {}

    def _write_locked(self, batches: list[PartitionBatch[Message]]) -> None:
        started = time.perf_counter()
        recorded = [b for b in batches if b.forced_last is None]
        if recorded:
            self.store.record_batches(
                [(b.topic, b.partition, b.first_offset, b.last_offset, len(b)) for b in recorded]
            )
        if batches[0].topic == self.aggregates_topic:
            refused = self._insert_aggregates(batches[0])
        else:
            refused = self._insert_uploads(batches)
        topics = self.settings.topics
        for r in refused:
            headers = deadletter_headers("sink", r.reason, r.detail, r.source, r.partial)
            self.producer.produce(
                topics.quarantine if r.quarantine else topics.deadletter,
                key=r.message.key(),
                value=r.message.value(),
                # produce() only reads the list; its stub's invariant List rejects the
                # narrower (name, bytes) pairs.
                headers=cast("list[tuple[str, str | bytes | None]]", headers),
            )
            if r.quarantine:
                metrics.QUARANTINED.labels(r.reason).inc()
            else:
                metrics.DEADLETTERED.labels("sink", r.reason).inc()
        if refused and self.producer.flush(30) > 0:
            raise SinkError(
                "the dead-letter/quarantine topics did not acknowledge within 30 s; not committing"
            )
        ends: dict[tuple[str, int], int] = {}
        for b in batches:
            ends[(b.topic, b.partition)] = max(
                ends.get((b.topic, b.partition), 0), b.last_offset + 1
            )
        done = [TopicPartition(topic, partition, end) for (topic, partition), end in ends.items()]
        retry_kafka(lambda: self.consumer.commit(offsets=done, asynchronous=False), "commit")
        for b in batches:
            metrics.SINK_BATCH_MESSAGES.labels(self.region).observe(len(b))
            if b.topic == self.topic:
                metrics.SINK_BATCH_UPLOADS.labels(self.region).observe(b.weight)
        metrics.SINK_INSERT_SECONDS.labels(self.region).observe(time.perf_counter() - started)

    def _catch_up_registry(self, messages: list[Message]) -> None:
        """Read the registry copy up to the revisions the worker decided these with."""
        wanted: dict[str, int] = {}
        for m in messages:
            revision = header(m, h.REGISTRY_REVISION)
            if (
                revision
                and revision.isdigit()
                and (key := m.key())
                and header(m, h.CONTROL) is None
            ):
                vin = key.decode(errors="replace")
                wanted[vin] = max(wanted.get(vin, 0), int(revision))
        try:
            changed = self.registry.wait_for(wanted, self.settings.sink_registry_wait_s)
        except RegistryUnavailable as exc:
            raise SinkError(f"{exc}; not storing or committing this batch") from None
        if changed:
            log.info(
                "%d vehicles' registrations changed after the worker routed them (e.g. %s); "
                "deciding with the registry as it is now",
                len(changed),
                changed[0],
            )

    def _insert_uploads(self, batches: list[PartitionBatch[Message]]) -> list[Refused]:
        """Store a round of upload batches: what is read of the warehouse, the registry and
        Python is read once for the round; each batch keeps its own inserts and tokens."""
        messages, refused = [], []
        for batch in batches:
            expanded, broken = expand(batch.items, self._schemas)
            messages += expanded
            refused += [Refused(m, exc.reason, exc.detail, source(m)) for m, exc in broken]
        self._catch_up_registry(messages)
        tagged, untagged = screen(messages, self.region)
        refused += untagged
        fast = [m for m in tagged if written_with_newest(m)]
        facts = self._facts(fast)
        plain, slow = (
            plain_candidates(fast, facts, self.registry, self.region)
            if facts is not None
            else ([], fast)
        )
        slow += [m for m in tagged if not written_with_newest(m)]
        good, judged = judge(slow, self.region, self.registry)
        horizons = self._erasure_horizons({p.owner for p in plain} | {u.owner_id for u in good})
        stored = self._stored(
            [(p.owner, p.vin, p.upload_id) for p in plain]
            + [(u.owner_id, u.record["vin"], u.record["upload_id"]) for u in good]
        )
        plain, demoted = still_plain(plain, horizons, stored, good)
        more, judged_more = judge(demoted, self.region, self.registry)
        # a round spans partitions: a message is its partition, offset and raw source
        keyed = {(*coordinates(m)[1:], source(m)): (i, m) for i, m in enumerate(tagged)}
        good = sorted(good + more, key=lambda up: keyed[_message_key(up)][0])
        refused += judged + judged_more
        good, erased = drop_erased_samples(good, horizons)
        metrics.SINK_ERASED_DROPPED.labels(self.region, "sample").inc(erased)
        fresh, resends, skipped = sort_against_stored(good, stored)
        # An upload's pieces (one per owner) are one message.
        resent = {_message_key(up): up for up in resends}
        refused += [
            Refused(
                keyed[_message_key(up)][1],
                "duplicate_upload",
                f"upload {up.record['upload_id']} is already stored",
                up.raw_source,
            )
            for up in resent.values()
        ]
        self._record_pseudonyms(
            {(p.owner, p.vin) for p in plain} | {(up.owner_id, up.record["vin"]) for up in fresh},
            horizons,
        )
        batch_of = {(b.partition, offset): i for i, b in enumerate(batches) for offset in b.offsets}
        samples = 0
        for i, batch in enumerate(batches):
            mine = [p for p in plain if batch_of[(p.partition, p.provenance.offset)] == i]
            judged_here = [up for up in fresh if batch_of[(up.partition, up.offset)] == i]
            samples += self._insert_batch(batch, facts, mine, judged_here)
        # Counted once the round is stored: a round tried again is not counted twice.
        judged_messages = len({_message_key(up) for up in fresh})
        metrics.SINK_UPLOADS_BY_PATH.labels(self.region, "avro").inc(len(plain))
        metrics.SINK_UPLOADS_BY_PATH.labels(self.region, "python").inc(judged_messages)
        self.stored_uploads += len(plain) + judged_messages
        metrics.SINK_UPLOADS.labels(self.region).inc(len(plain) + judged_messages)
        metrics.SINK_SAMPLES.labels(self.region).inc(samples)
        metrics.SINK_REPLAYS_SKIPPED.labels(self.region).inc(skipped)
        return refused

    def _insert_batch(
        self,
        batch: PartitionBatch[Message],
        facts: pa.Table | None,
        plain: list[Plain],
        fresh: list[rowlib.StoredUpload],
    ) -> int:
        """One batch's samples and uploads, each one insert under the batch's token; the
        samples it stored."""
        rows = SampleRows()
        for p in plain:
            body = (p.message.value() or b"")[HEADER_LEN:]
            rows.add(body, p.owner, p.provenance.received_ms, NEWEST.version, p)
        for up in fresh:
            rows.add_piece(up)
        self.store.insert_samples(rows, self.region, batch.token)
        uploads = [rowlib.uploads_table(fresh)]
        if plain and facts is not None:
            uploads.append(
                plain_uploads_table(
                    facts,
                    [p.position for p in plain],
                    [p.owner for p in plain],
                    [p.provenance for p in plain],
                    self.region,
                    batch.topic,
                    batch.partition,
                )
            )
        self.store.insert("uploads", pa.concat_tables(uploads), batch.token)
        return rows.samples

    def _facts(self, fast: list[Message]) -> pa.Table | None:
        """The facts of the uploads in ``fast`` as the warehouse's parser reads them, or
        None (all judged in Python) when it cannot read them as the sink cut them."""
        if not fast:
            return None
        try:
            facts = self.store.upload_facts(facts_container(fast))
        except WarehouseError as exc:
            log.warning(
                "the warehouse could not read a batch's uploads (%s); judging them one by one",
                str(exc).splitlines()[0][:200],
            )
            return None
        if not facts_match(facts, fast):
            log.warning(
                "the warehouse read %d uploads where the round holds %d; judging them one by one",
                facts.num_rows,
                len(fast),
            )
            return None
        return facts

    def _insert_aggregates(self, batch: PartitionBatch[Message]) -> list[Refused]:
        records: list[dict[str, Any]] = []
        messages: list[Message] = []
        refused: list[Refused] = []
        decoded: list[tuple[Message, dict[str, Any] | str]] = []
        for m in batch.items:
            try:
                decoded.append((m, decode_aggregate(m.value() or b"", self._schemas)))
            except ValueError as exc:
                decoded.append((m, f"{type(exc).__name__}: {exc}"[:500]))
        named = (r.get("owner_id") for _, r in decoded if isinstance(r, dict))
        horizons = self._erasure_horizons({o for o in named if isinstance(o, str)})
        for m, record in decoded:
            source = f"{m.topic()}:{m.partition()}:{m.offset()}"
            verdict: Literal["keep"] | tuple[str, str] | None
            if isinstance(record, str):
                verdict = ("malformed_aggregate", record)
            else:
                try:
                    verdict = self._aggregate_verdict(record, horizons)
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    verdict = ("malformed_aggregate", f"{type(exc).__name__}: {exc}"[:500])
            if verdict == "keep":
                assert isinstance(record, dict)
                records.append(record)
                messages.append(m)
            elif verdict is not None:
                refused.append(Refused(m, *verdict, source))
        tables, misfits = _fitting_tables(records)
        for i, why in misfits:
            m = messages[i]
            refused.append(
                Refused(m, "malformed_aggregate", why, f"{m.topic()}:{m.partition()}:{m.offset()}")
            )
        bad = {i for i, _ in misfits}
        records = [r for i, r in enumerate(records) if i not in bad]
        self._record_pseudonyms({(r["owner_id"], r["vin"]) for r in records}, horizons)
        for table, data in sorted(tables.items()):
            self.store.insert(table, data, batch.token)
        return refused

    def _aggregate_verdict(
        self, record: dict[str, Any], horizons: dict[str, int]
    ) -> Literal["keep"] | tuple[str, str] | None:
        """ "keep", a (reason, detail) refusal, or None (dropped: erased)."""
        if not all(isinstance(record.get(k), str) for k in ("kind", "vin", "owner_id", "region")):
            return "malformed_aggregate", "kind, vin, owner_id and region must be text"
        kind = record["kind"]
        if record.get("region") != self.region:
            return "residency_mismatch", f"{kind} of region {record.get('region')!r}"
        if not self._registered_for(record):
            return (
                "not_registered_at_that_time",
                f"{kind} of {record.get('vin')!r}: its owner is not registered here at its time",
            )
        if not keep_aggregate(record, horizons):
            metrics.SINK_ERASED_DROPPED.labels(self.region, kind).inc()
            return None
        return "keep"

    def _registered_for(self, record: dict[str, Any]) -> bool:
        vin, owner = record.get("vin"), record.get("owner_id")
        if not isinstance(vin, str) or not isinstance(owner, str) or not owner:
            return False
        return held_by_owner(record, self.registry.get(vin), self.region)


def _message_key(up: rowlib.StoredUpload) -> tuple[int, int, str]:
    """The message a piece of an upload came from (an upload's pieces share it)."""
    return up.partition, up.offset, up.raw_source


def _fitting_tables(
    records: list[dict[str, Any]],
) -> tuple[dict[str, pa.Table], list[tuple[int, str]]]:
    """The records as tables, and (index, why) of those that fit none: one odd record is
    dead-lettered, not a reason to stop. The whole batch is tried first; only when it
    fails is each record tried alone."""
    failures = (KeyError, ValueError, TypeError, pa.ArrowException)
    try:
        return aggregate_tables(records), []
    except failures:
        pass
    misfits = []
    for i, record in enumerate(records):
        try:
            aggregate_tables([record])
        except failures as exc:
            misfits.append((i, f"{type(exc).__name__}: {exc}"[:500]))
    bad = {i for i, _ in misfits}
    return aggregate_tables([r for i, r in enumerate(records) if i not in bad]), misfits


def run_sink(settings: Settings) -> None:
    """`vtp sink --region R`, until SIGTERM/SIGINT (which finish the current batch)."""
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    sink = RegionSink(settings)
    signal.signal(signal.SIGTERM, sink.stop)
    signal.signal(signal.SIGINT, sink.stop)
    sink.run()

"""In-memory doubles of what the sink talks to: a region's topics with one consumer group,
a producer, the registry copy and the warehouse side (``SinkStore``). They keep one
ordered log of what happened (``events``), so a test can say "committed after stored".

The store deduplicates inserts by token, as ClickHouse does with
``insert_deduplication_token``; the integration tests check the real engine does."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import fastavro
import pyarrow as pa
from confluent_kafka import Message, TopicPartition

from schemas.registry import Registration
from sinks.columnar import SampleRows
from sinks.rows import StoredUpload, samples_table


@dataclass
class MemoryKafka:
    partitions: int = 2
    logs: dict[tuple[str, int], list[Message]] = field(default_factory=dict)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    produced: list[tuple[str, bytes | None, bytes | None, dict[str, bytes]]] = field(
        default_factory=list
    )
    events: list[str] = field(default_factory=list)
    unacknowledged: int = 0  # what a producer's flush() says is still waiting

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: Iterable[tuple[str, bytes]] = (),
        timestamp_ms: int = 1_790_000_000_000,
    ) -> Message:
        log = self.logs.setdefault((topic, partition), [])
        message = Message(
            topic=topic,
            partition=partition,
            offset=len(log),
            key=key,
            value=value,
            headers=list(headers),
            timestamp=(1, timestamp_ms),
        )
        log.append(message)
        return message

    def consumer(self) -> MemoryConsumer:
        return MemoryConsumer(self)

    def producer(self) -> MemoryProducer:
        return MemoryProducer(self)


class MemoryConsumer:
    """One group member holding every partition; a new one starts at the committed
    offsets, as a restarted process does."""

    def __init__(self, kafka: MemoryKafka):
        self.kafka = kafka
        self.topics: list[str] = []
        self.positions: dict[tuple[str, int], int] = {}

    def subscribe(self, topics: list[str], on_revoke: Callable[..., None] | None = None) -> None:
        self.topics = topics
        for topic in topics:
            for p in range(self.kafka.partitions):
                self.positions[(topic, p)] = self.kafka.committed.get((topic, p), 0)

    def consume(self, num_messages: int = 1, timeout: float = 0.0) -> list[Message]:
        out: list[Message] = []
        for tp, position in sorted(self.positions.items()):
            log = self.kafka.logs.get(tp, [])
            taken = log[position : position + num_messages - len(out)]
            self.positions[tp] = position + len(taken)
            out += taken
        return out

    def drained(self) -> bool:
        return all(pos >= len(self.kafka.logs.get(tp, [])) for tp, pos in self.positions.items())

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        for tp in offsets:
            self.kafka.committed[(tp.topic, tp.partition)] = tp.offset
            self.kafka.events.append(f"commit {tp.topic}:{tp.partition}@{tp.offset}")

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in sorted(self.positions)]

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.positions[(tp.topic, tp.partition)])
            for tp in tps
        ]

    def get_watermark_offsets(self, tp: TopicPartition, **_: Any) -> tuple[int, int]:
        return 0, len(self.kafka.logs.get((tp.topic, tp.partition), []))

    def close(self) -> None:
        pass


class MemoryProducer:
    def __init__(self, kafka: MemoryKafka):
        self.kafka = kafka

    def produce(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.kafka.produced.append((topic, key, value, dict(headers or [])))
        self.kafka.events.append(f"produce {topic}")

    def flush(self, timeout: float = 0.0) -> int:
        return self.kafka.unacknowledged


class StaticRegistry(dict[str, Registration]):
    """The registry copy, already caught up."""

    def start(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def wait_for(self, wanted: dict[str, int], timeout: float) -> list[str]:
        return []


class Crash(Exception):
    """The process dying (not a warehouse error: nothing retries it)."""


@dataclass
class MemoryStore:
    events: list[str]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tokens: set[tuple[str, str]] = field(default_factory=set)
    batches: list[tuple[str, int, int, int]] = field(default_factory=list)
    erasures: dict[str, int] = field(default_factory=dict)
    pseudonym_pairs: set[tuple[str, str]] = field(default_factory=set)
    fail_on: Callable[[str], None] = lambda table: None  # raise here to fail an insert
    description: str = "memory"

    def prepare(self) -> None:
        pass

    def recorded_ranges(self, topic: str, partition: int, from_offset: int) -> dict[int, int]:
        return {
            b[2]: b[3] for b in self.batches if b[:2] == (topic, partition) and b[2] >= from_offset
        }

    def record_batches(self, batches: list[tuple[str, int, int, int, int]]) -> None:
        self.batches += [b[:4] for b in batches]

    def stored_copies(
        self, owners: list[str], vins: list[str], upload_ids: list[str]
    ) -> dict[str, tuple[str, str, int, int]]:
        return {
            r["upload_id"]: (r["raw_source"], r["topic"], r["partition"], r["offset"])
            for r in self.tables.get("uploads", [])
            if r["owner_id"] in owners and r["vin"] in vins and r["upload_id"] in upload_ids
        }

    def erasure_horizons(self, owners: list[str]) -> dict[str, int]:
        return {o: self.erasures[o] for o in owners if o in self.erasures}

    def record_pseudonyms(self, pairs: set[tuple[str, str]]) -> None:
        self.pseudonym_pairs |= pairs

    def upload_facts(self, container: bytes) -> pa.Table:
        records = list(fastavro.reader(io.BytesIO(container)))
        return pa.Table.from_pylist(
            [
                {
                    "position": i,
                    "text_ok": True,  # fastavro has decoded it: its text is UTF-8
                    "min_seq": min((s["seq"] for s in r["samples"]), default=0),
                    "vin": r["vin"],
                    "upload_id": r["upload_id"],
                    "sent_at_ms": r["sent_at_ms"],
                    "gateway_firmware": r["gateway_firmware"],
                    "sample_count": len(r["samples"]),
                    "first_ms": min((s["event_time_ms"] for s in r["samples"]), default=0),
                    "last_ms": max((s["event_time_ms"] for s in r["samples"]), default=0),
                }
                for i, r in enumerate(records)
            ]
        )

    def insert_samples(self, rows: SampleRows, region: str, token: str) -> None:
        """The rows the warehouse's INSERT makes of the container (SAMPLES_SQL)."""
        records = list(fastavro.reader(io.BytesIO(rows.container())))
        uploads = [
            StoredUpload(r, owner, region, version, received, "", "", 0, 0)
            for r, owner, received, version in zip(
                records, rows.owners, rows.received_ms, rows.versions, strict=True
            )
        ]
        self.insert("samples", samples_table(uploads), token)

    def insert(self, table: str, data: pa.Table, token: str) -> None:
        self.fail_on(table)
        if (table, token) in self.tokens:
            self.events.append(f"insert {table} {token} (deduplicated)")
            return
        self.tokens.add((table, token))
        self.tables.setdefault(table, []).extend(data.to_pylist())
        self.events.append(f"insert {table} {token}")

    def close(self) -> None:
        pass

"""What the sink needs of its warehouse, in the sink's own words.

``RegionSink`` speaks to a ``SinkStore``: ``WarehouseSinkStore`` is the real one (the SQL
of the sink, over the ClickHouse engine or server); tests put an in-memory store in its
place to drive the sink's flow (commit after insert, replay after a crash, refusals)
without a warehouse.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from sinks.classify import StoredCopies
from sinks.columnar import FACTS_SQL, ONE_STREAM, SAMPLES_SQL, STRUCTURE, SampleRows
from sinks.migrations import DEFAULT_OPTIONS, MigrationOptions, migrate
from sinks.pseudonyms import backfill, record_pairs
from vtp.core.warehouse import Input, Warehouse, rows


class SinkStore(Protocol):
    description: str

    def prepare(self) -> None:
        """Bring the schema up to date before the first batch."""

    def recorded_ranges(self, topic: str, partition: int, from_offset: int) -> dict[int, int]:
        """first offset -> last offset of the batches recorded as starting at or after
        ``from_offset`` (the latest record of each): a replay after a crash covers the same
        range, so it carries the same token."""

    def record_batches(self, batches: list[tuple[str, int, int, int, int]]) -> None:
        """(topic, partition, first offset, last offset, messages) of the batches about to
        be written, in one insert."""

    def stored_copies(
        self, owners: list[str], vins: list[str], upload_ids: list[str]
    ) -> StoredCopies: ...

    def erasure_horizons(self, owners: list[str]) -> dict[str, int]:
        """The latest erasure time (ms) of each of ``owners`` that erased."""

    def record_pseudonyms(self, pairs: set[tuple[str, str]]) -> None:
        """(owner, vin) pairs the analyst views need pseudonyms for."""

    def upload_facts(self, container: bytes) -> pa.Table:
        """Each upload of ``container`` (Avro, the newest upload schema), in order, read by
        the warehouse's own parser: position, vin, upload_id, sent_at_ms, gateway_firmware,
        sample_count, first_ms, last_ms."""

    def insert_samples(self, rows: SampleRows, region: str, token: str) -> None:
        """Insert the samples of ``rows`` once (as ``insert``)."""

    def insert(self, table: str, data: pa.Table, token: str) -> None:
        """Insert once: a second insert with the same token is a no-op."""

    def close(self) -> None: ...


class WarehouseSinkStore:
    def __init__(
        self,
        warehouse: Warehouse,
        pseudonym_key: bytes,
        owns: bool,
        migration: MigrationOptions = DEFAULT_OPTIONS,
    ):
        self.warehouse = warehouse
        self._migration = migration
        self.description = warehouse.description
        self._key = pseudonym_key
        self._owns = owns  # a warehouse handed in stays open for its owner

    def prepare(self) -> None:
        migrate(self.warehouse, options=self._migration)
        backfill(self.warehouse, self._key)

    def recorded_ranges(self, topic: str, partition: int, from_offset: int) -> dict[int, int]:
        found = rows(
            self.warehouse.query(
                "SELECT first_offset, argMax(last_offset, recorded_at) FROM sink_batches "
                "WHERE topic = {t:String} AND partition = {p:UInt32} AND first_offset >= {f:UInt64} "
                "GROUP BY first_offset",
                {"t": topic, "p": partition, "f": from_offset},
            )
        )
        return {int(first): int(last) for first, last in found}

    def record_batches(self, batches: list[tuple[str, int, int, int, int]]) -> None:
        topics, partitions, firsts, lasts, counts = (list(c) for c in zip(*batches, strict=True))
        self.warehouse.execute(
            "INSERT INTO sink_batches (topic, partition, first_offset, last_offset, messages) "
            "SELECT tupleElement(b, 1), tupleElement(b, 2), tupleElement(b, 3), "
            "tupleElement(b, 4), tupleElement(b, 5) FROM (SELECT arrayJoin(arrayZip("
            "{t:Array(String)}, {p:Array(UInt32)}, {f:Array(UInt64)}, {l:Array(UInt64)}, "
            "{n:Array(UInt32)})) AS b)",
            {"t": topics, "p": partitions, "f": firsts, "l": lasts, "n": counts},
        )

    def stored_copies(
        self, owners: list[str], vins: list[str], upload_ids: list[str]
    ) -> StoredCopies:
        result = self.warehouse.query(
            "SELECT upload_id, raw_source, topic, partition, offset FROM uploads "
            "WHERE owner_id IN {owners:Array(String)} AND vin IN {vins:Array(String)} "
            "AND upload_id IN {ids:Array(String)}",
            {"owners": owners, "vins": vins, "ids": upload_ids},
        )
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows(result)}

    def erasure_horizons(self, owners: list[str]) -> dict[str, int]:
        # Read by the primary key: never stale, and the table stays small (a year's TTL).
        found = self.warehouse.query(
            "SELECT owner_id, toUnixTimestamp64Milli(max(requested_at)) FROM erasures "
            "WHERE owner_id IN {o:Array(String)} GROUP BY owner_id",
            {"o": owners},
        )
        return {owner: int(ms) for owner, ms in rows(found)}

    def record_pseudonyms(self, pairs: set[tuple[str, str]]) -> None:
        record_pairs(self.warehouse, self._key, pairs)

    def upload_facts(self, container: bytes) -> pa.Table:
        return self.warehouse.query_inputs(FACTS_SQL, _uploads(container))

    def insert_samples(self, rows: SampleRows, region: str, token: str) -> None:
        if rows.bodies:
            self.warehouse.execute_inputs(
                SAMPLES_SQL,
                _uploads(rows.container()),
                rows.params(region),
                {**ONE_STREAM, "insert_deduplication_token": token},
            )

    def insert(self, table: str, data: pa.Table, token: str) -> None:
        self.warehouse.insert_arrow(table, data, token)

    def close(self) -> None:
        if self._owns:
            self.warehouse.close()


def _uploads(container: bytes) -> dict[str, Input]:
    return {"upload_container": Input(container, "Avro", STRUCTURE)}

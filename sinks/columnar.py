"""A batch's samples stored by ClickHouse's own Avro parser, not built row by row in Python.

The uploads of a round written with the newest upload schema are handed to the warehouse
as one Avro object container, their bodies as the vehicles sent them, one block each (so
a body that is not exactly one record cannot shift what is read from the bodies after
it). The warehouse reads each upload's facts from it (``FACTS_SQL``: VIN, upload id,
sample count, first sample time, whether its text is valid UTF-8); from those facts
(never from the worker's sidecar) the sink decides which uploads are *plain*: keyed by
the VIN they hold, with all their samples in the vehicle's current period here, so they
belong whole to its current owner, with nothing to clamp. What is not plain (another
schema version, samples before a sale, an erasure or a stored copy to reckon with, facts
the warehouse could not read) is decoded in Python and judged as before; the pieces to
store are encoded again into the same container. A batch's samples are then one
``INSERT … SELECT`` (``SAMPLES_SQL``) under the batch's deduplication token, whichever
way each upload went; the statement checks every row's VIN and upload id against what
the sink decided about its position, and fails rather than store a row under an owner
decided for another upload.

A replay carries the same token, so it is dropped whatever it decides: ClickHouse keeps
one token per block of up to ~1M rows (``min_insert_block_size_rows``) and per month
partition, so a replay of a batch larger than that, or one that decides to store rows of
a month the first attempt had none of, may store those again; the same held for the
Python rows inserted before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from confluent_kafka import Message

from schemas import Schema, default_store
from schemas.codec import HEADER_LEN, MARKER
from schemas.envelope import container_of_blocks
from schemas.registry import Registration
from sinks.classify import StoredCopies, received_ms, source
from sinks.rows import SIGNAL_COLUMNS, TS, UPLOADS_SCHEMA, StoredUpload
from vtp.core.kafka import coordinates

NEWEST = default_store().get("VehicleUpload")

_PRIMITIVES = {
    "string": "String",
    "long": "Int64",
    "int": "Int32",
    "float": "Float32",
    "double": "Float64",
    "boolean": "Bool",
}


def clickhouse_type(avro: Any) -> str:
    """The ClickHouse type its Avro input format reads ``avro`` as (the kinds vtp's upload
    schemas use; anything else is refused, not guessed)."""
    if isinstance(avro, str):
        if avro in _PRIMITIVES:
            return _PRIMITIVES[avro]
    elif isinstance(avro, list):
        kinds = [k for k in avro if k != "null"]
        if len(avro) == 2 and len(kinds) == 1:
            return f"Nullable({clickhouse_type(kinds[0])})"
    elif isinstance(avro, dict):
        kind = avro.get("type")
        if kind == "array":
            return f"Array({clickhouse_type(avro['items'])})"
        if kind == "enum":
            return "String"
        if kind == "record":
            fields = ", ".join(f"{f['name']} {clickhouse_type(f['type'])}" for f in avro["fields"])
            return f"Tuple({fields})"
        if kind in _PRIMITIVES:
            return _PRIMITIVES[kind]
    raise ValueError(f"no ClickHouse type for the Avro type {avro!r}")


def structure(schema: Schema) -> str:
    """The columns of ``schema``'s records, as ClickHouse's file() and external data take them."""
    return ", ".join(
        f"{f['name']} {clickhouse_type(f['type'])}" for f in schema.definition["fields"]
    )


STRUCTURE = structure(NEWEST)

# One stream, so the rows come in container order and the insert forms as few blocks as
# it can (each block's deduplication id derives from the token and its number); and a
# batch whose samples span more than 100 months is stored, not refused on every retry.
ONE_STREAM = {"max_threads": 1, "throw_on_max_partitions_per_insert_block": 0}

_TEXT_OK = (
    "isValidUTF8(vin) AND isValidUTF8(upload_id) AND isValidUTF8(gateway_firmware) "
    "AND arrayAll(d -> isValidUTF8(d), arrayFlatten(samples.dtcs))"
)
# Invalid text is not handed to Python as text (it would not decode): its row says so.
FACTS_SQL = f"""
SELECT position, text_ok, if(text_ok, u.vin, '') AS vin,
       if(text_ok, u.upload_id, '') AS upload_id, u.sent_at_ms AS sent_at_ms,
       if(text_ok, u.gateway_firmware, '') AS gateway_firmware,
       length(u.samples) AS sample_count, arrayMin(u.samples.seq) AS min_seq,
       arrayMin(u.samples.event_time_ms) AS first_ms,
       arrayMax(u.samples.event_time_ms) AS last_ms
FROM (SELECT *, rowNumberInAllBlocks() AS position, {_TEXT_OK} AS text_ok
      FROM @upload_container) AS u
SETTINGS max_threads = 1
"""

_SIGNALS = ", ".join(SIGNAL_COLUMNS)
_SAMPLE_SIGNALS = ", ".join(f"s.{name}" for name in SIGNAL_COLUMNS)
SAMPLES_SQL = f"""
INSERT INTO samples (owner_id, vin, event_time, seq, upload_id, {_SIGNALS}, dtcs, region,
                     schema_version, received_at)
SELECT {{owners:Array(String)}}[position], vin, fromUnixTimestamp64Milli(s.event_time_ms, 'UTC'),
       s.seq, upload_id, {_SAMPLE_SIGNALS}, s.dtcs, {{region:String}},
       {{versions:Array(UInt8)}}[position],
       fromUnixTimestamp64Milli({{received:Array(Int64)}}[position], 'UTC')
FROM (SELECT *, rowNumberInAllBlocks() + 1 AS position FROM @upload_container)
ARRAY JOIN samples AS s
WHERE throwIf(
    vin != {{vins:Array(String)}}[position] OR upload_id != {{ids:Array(String)}}[position],
    'an upload in the container is not the one the sink decided its owner for'
) = 0
"""


def plain_owner(registration: Registration | None, region: str, first_ms: int) -> str | None:
    """The owner an upload belongs to whole when its first sample (and so every later one)
    falls in the vehicle's current, open period here; None when it needs judging sample by
    sample (a period that has ended clamps times, a sale splits)."""
    if registration is None:
        return None
    period = registration.here(region, first_ms)
    if period is None or registration.end_of(period) is not None:
        return None
    return period.owner_id or None


@dataclass
class SampleRows:
    """The container of a batch's samples and, per upload in it, what the sink adds."""

    bodies: list[bytes] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    received_ms: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    vins: list[str] = field(default_factory=list)  # what each body must hold
    upload_ids: list[str] = field(default_factory=list)
    samples: int = 0

    def add(self, body: bytes, owner: str, received_ms: int, version: int, plain: Plain) -> None:
        self._add(body, owner, received_ms, version, plain.vin, plain.upload_id, plain.samples)

    def _add(
        self,
        body: bytes,
        owner: str,
        received_ms: int,
        version: int,
        vin: str,
        upload_id: str,
        samples: int,
    ) -> None:
        self.samples += samples
        self.bodies.append(body)
        self.owners.append(owner)
        self.received_ms.append(received_ms)
        self.versions.append(version)
        self.vins.append(vin)
        self.upload_ids.append(upload_id)

    def add_piece(self, piece: StoredUpload) -> None:
        """A piece judged in Python, encoded again with the newest schema (an older
        version's record reads as the newest one's, its new fields at their defaults)."""
        record = piece.record
        body = default_store().encode(record, NEWEST)[HEADER_LEN:]
        self._add(
            body,
            piece.owner_id,
            piece.received_ms,
            piece.schema_version,
            record["vin"],
            record["upload_id"],
            len(record["samples"]),
        )

    def container(self) -> bytes:
        return container_of_blocks(NEWEST, self.bodies)

    def params(self, region: str) -> dict[str, Any]:
        return {
            "owners": self.owners,
            "received": self.received_ms,
            "versions": self.versions,
            "vins": self.vins,
            "ids": self.upload_ids,
            "region": region,
        }


@dataclass(frozen=True)
class Provenance:
    """Where a plain upload came from, for its row in the uploads table."""

    received_ms: int
    raw_source: str
    offset: int  # of its batch message in the validated topic


def plain_uploads_table(
    facts: pa.Table,
    positions: list[int],
    owners: list[str],
    provenance: list[Provenance],
    region: str,
    topic: str,
    partition: int,
) -> pa.Table:
    """Rows of the uploads table for the plain uploads at ``positions`` of ``facts``."""
    picked = facts.take(pa.array(positions, pa.int64()))
    n = len(positions)

    def times(column: str) -> pa.Array:
        return picked.column(column).cast(pa.int64()).cast(TS)

    columns = {
        "owner_id": pa.array(owners, pa.string()),
        "vin": picked.column("vin"),
        "upload_id": picked.column("upload_id"),
        "sent_at": times("sent_at_ms"),
        "received_at": pa.array([p.received_ms for p in provenance], pa.int64()).cast(TS),
        "first_event_time": times("first_ms"),
        "last_event_time": times("last_ms"),
        "sample_count": picked.column("sample_count"),
        "gateway_firmware": picked.column("gateway_firmware"),
        "schema_version": pa.array([NEWEST.version] * n, pa.uint8()),
        "region": pa.array([region] * n, pa.string()),
        "raw_source": pa.array([p.raw_source for p in provenance], pa.string()),
        "topic": pa.array([topic] * n, pa.string()),
        "partition": pa.array([partition] * n, pa.uint32()),
        "offset": pa.array([p.offset for p in provenance], pa.uint64()),
    }
    return pa.table(
        [columns[name].cast(UPLOADS_SCHEMA.field(name).type) for name in UPLOADS_SCHEMA.names],
        schema=UPLOADS_SCHEMA,
    )


@dataclass(frozen=True)
class Plain:
    """An upload stored whole under one owner, straight from its Avro body."""

    message: Message
    position: int  # its row in the facts
    owner: str
    upload_id: str
    vin: str
    first_ms: int
    samples: int
    provenance: Provenance

    @property
    def partition(self) -> int:
        return coordinates(self.message)[1]

    @property
    def here(self) -> tuple[str, str, int, int]:
        topic, partition, offset = coordinates(self.message)
        return self.provenance.raw_source, topic, partition, offset


def written_with_newest(message: Message) -> bool:
    return (message.value() or b"")[:HEADER_LEN] == MARKER + NEWEST.fingerprint


def facts_container(fast: list[Message]) -> bytes:
    return container_of_blocks(NEWEST, [(m.value() or b"")[HEADER_LEN:] for m in fast])


def facts_match(facts: pa.Table, fast: list[Message]) -> bool:
    """The warehouse read one upload per message, in order."""
    positions: list[int] = facts.column("position").to_pylist()
    return positions == list(range(len(fast)))


def plain_candidates(
    fast: list[Message], facts: pa.Table, registry: Mapping[str, Registration], region: str
) -> tuple[list[Plain], list[Message]]:
    """(uploads of one owner by the registry alone, the others to judge in Python): an
    upload keyed by another VIN than it holds, with text that is not UTF-8 or a negative
    sequence number is judged (and refused) in Python."""
    plain, judge = [], []
    names = ("vin", "upload_id", "sample_count", "first_ms", "text_ok", "min_seq")
    columns = [facts.column(c).to_pylist() for c in names]
    for i, (m, vin, upload_id, count, first_ms, text_ok, min_seq) in enumerate(
        zip(fast, *columns, strict=True)
    ):
        sound = text_ok and count and min_seq >= 0 and (m.key() or b"") == vin.encode()
        owner = plain_owner(registry.get(vin), region, first_ms) if sound else None
        if owner is None:
            judge.append(m)
            continue
        _, _, offset = coordinates(m)
        where = Provenance(received_ms(m), source(m), offset)
        plain.append(Plain(m, i, owner, upload_id, vin, first_ms, count, where))
    return plain, judge


def still_plain(
    plain: list[Plain],
    horizons: Mapping[str, int],
    stored: StoredCopies,
    judged: list[StoredUpload],
) -> tuple[list[Plain], list[Message]]:
    """(uploads still stored whole, those to judge in Python after all): an erasure of
    their owner at or after their time, a stored copy that is not this very message (a
    resend or a worker's replay), or another message of the batch with the same upload id
    is judged as before."""
    holders: dict[str, set[tuple[int, str]]] = {}
    for up in judged:
        holders.setdefault(up.record["upload_id"], set()).add((up.offset, up.raw_source))
    for p in plain:
        holders.setdefault(p.upload_id, set()).add((p.provenance.offset, p.provenance.raw_source))
    keep, judge = [], []
    for p in plain:
        horizon = horizons.get(p.owner)
        erased = horizon is not None and min(p.first_ms, p.provenance.received_ms) <= horizon
        prior = stored.get(p.upload_id)
        if erased or (prior is not None and prior != p.here) or len(holders[p.upload_id]) > 1:
            judge.append(p.message)
        else:
            keep.append(p)
    return keep, judge

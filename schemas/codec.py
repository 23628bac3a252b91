"""Avro single-object encoding (spec 1.11 "Single-object encoding").

A framed message is ``C3 01`` + the 8-byte little-endian CRC-64-AVRO fingerprint of
the writer schema's parsing canonical form + the schemaless Avro body. A reader finds
the writer schema by fingerprint in a SchemaStore; it never guesses.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.types import Schema as ParsedSchema

MARKER = b"\xc3\x01"
HEADER_LEN = len(MARKER) + 8
# What one upload may weigh and hold. Gateways upload every few seconds (a minute of 1 Hz
# samples is ~6 KB); the limits stay far below the broker's message limit so that a
# routed copy with its headers always fits where the original did.
MAX_UPLOAD_BYTES = 512 * 1024
MAX_SAMPLES_PER_UPLOAD = 3600
MAX_ID_CHARS = 128
SCHEMA_DIR = Path(__file__).resolve().parent


class FramingError(ValueError):
    """A message is not a decodable single-object Avro record.

    ``reason`` is a stable code for the dead-letter topic: not_single_object,
    unknown_schema or malformed_avro.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Schema:
    name: str  # full name, e.g. vtp.telemetry.VehicleUpload
    version: int
    definition: dict[str, Any] = field(repr=False)
    parsed: ParsedSchema = field(repr=False, compare=False)
    fingerprint: bytes  # 8 bytes, little-endian, as framed on the wire

    @classmethod
    def from_definition(cls, definition: dict[str, Any]) -> Schema:
        parsed = parse_schema(definition)  # keeps fastavro from re-parsing on every call
        canonical = to_parsing_canonical_form(definition)
        # fastavro gives the fingerprint's little-endian bytes in hex: the wire order.
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
        return cls(
            name=f"{definition.get('namespace', '')}.{definition['name']}".lstrip("."),
            version=int(definition.get("vtp_version", 1)),
            definition=definition,
            parsed=parsed,
            fingerprint=fp,
        )

    @classmethod
    def from_file(cls, path: Path) -> Schema:
        return cls.from_definition(json.loads(path.read_text()))


class SchemaStore:
    """Known writer schemas, by fingerprint; the reader side of schema evolution."""

    def __init__(self, schemas: list[Schema] | None = None):
        self._by_fingerprint: dict[bytes, Schema] = {}
        self._by_name: dict[tuple[str, int], Schema] = {}
        for schema in schemas or []:
            self.add(schema)

    def add(self, schema: Schema) -> None:
        self._by_fingerprint[schema.fingerprint] = schema
        self._by_name[(schema.name, schema.version)] = schema

    def get(self, name: str, version: int | None = None) -> Schema:
        """The schema called ``name`` (short or full) at ``version`` (default: newest)."""
        matches = [
            s
            for (full, v), s in self._by_name.items()
            if (full == name or full.rsplit(".", 1)[-1] == name)
            and (version is None or v == version)
        ]
        if not matches:
            raise KeyError(f"no schema {name!r} version {version} in the store")
        return max(matches, key=lambda s: s.version)

    def by_fingerprint(self, fp: bytes) -> Schema | None:
        return self._by_fingerprint.get(fp)

    def fingerprints(self, name: str) -> frozenset[bytes]:
        """Every version of the schema called ``name`` (short or full), as framed."""
        return frozenset(
            s.fingerprint
            for (full, _), s in self._by_name.items()
            if full == name or full.rsplit(".", 1)[-1] == name
        )

    def encode(self, record: Mapping[str, Any], schema: Schema) -> bytes:
        buf = io.BytesIO()
        buf.write(MARKER)
        buf.write(schema.fingerprint)
        schemaless_writer(buf, schema.parsed, record)
        return buf.getvalue()

    def writer_schema(self, data: bytes) -> Schema:
        if len(data) < HEADER_LEN or data[:2] != MARKER:
            raise FramingError(
                "not_single_object",
                f"{len(data)} bytes that do not start with the Avro single-object marker C3 01",
            )
        fp = bytes(data[2:HEADER_LEN])
        schema = self._by_fingerprint.get(fp)
        if schema is None:
            raise FramingError(
                "unknown_schema", f"writer schema fingerprint {fp[::-1].hex()} is not in the store"
            )
        return schema

    def decode(self, data: bytes, reader: Schema | None = None) -> tuple[dict[str, Any], Schema]:
        """Decode a framed record; with ``reader``, resolve it to that schema's shape."""
        writer = self.writer_schema(data)
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            if reader is None or reader.fingerprint == writer.fingerprint:
                record = schemaless_reader(buf, writer.parsed, None)
            else:
                record = schemaless_reader(buf, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError...
            raise FramingError(
                "malformed_avro", f"{writer.name} v{writer.version}: {type(exc).__name__}: {exc}"
            ) from None
        if buf.tell() != len(data):
            raise FramingError(
                "malformed_avro",
                f"{writer.name} v{writer.version}: {len(data) - buf.tell()} trailing bytes",
            )
        assert isinstance(record, dict)  # the store holds record schemas: fastavro gives dicts
        return record, writer


@cache
def default_store() -> SchemaStore:
    """Every schema shipped in this folder (all versions: old writers stay readable)."""
    return SchemaStore([Schema.from_file(p) for p in sorted(SCHEMA_DIR.glob("*.avsc"))])

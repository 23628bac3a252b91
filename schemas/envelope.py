"""Batches of uploads on the validated topic: one Avro object container per message.

The worker sends a region's accepted uploads as batches, one Kafka message per source
partition, writer schema and batch, instead of one message per upload: the per-message
costs of the producer, the broker and the sink's consumer are paid once per batch.

A batch message's value is an Avro object container file (Avro spec, "Object Container
Files"): the writer schema in its header, codec ``null``, one data block holding the
uploads' bodies exactly as the vehicles sent them (without their single-object header),
and the sync marker. Any Avro tool reads it; ClickHouse's ``Avro`` input format parses
it. Its ``vtp-batch`` header (JSON) says, for each upload in block order, where it first
reached Kafka (raw offset), when (broker time), the registry revision the worker decided
it with, its key and its body's length, so a reader can take the uploads apart without
decoding them and give back each upload's own bytes (to dead-letter one, for instance).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from schemas.codec import HEADER_LEN, MARKER, FramingError, Schema, SchemaStore

MAGIC = b"Obj\x01"
FINGERPRINT_KEY = "vtp.fingerprint"  # the writer schema's fingerprint, hex, wire order
BATCH_HEADER = "vtp-batch"
# A batch message stays well under the broker's and the producer's 1 MB default, with room
# for its headers; a batch always takes at least one upload.
MAX_BATCH_BYTES = 768 * 1024


@dataclass(frozen=True)
class BatchedUpload:
    value: bytes  # single-object bytes: marker, fingerprint, body
    key: bytes
    offset: int  # in the source partition
    received_ms: int
    revision: int


def _long(n: int) -> bytes:
    """Avro's zig-zag varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_long(data: memoryview, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise FramingError("malformed_batch", "a truncated or overlong Avro long")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def _bytes(b: bytes) -> bytes:
    return _long(len(b)) + b


def container_header(writer: Schema) -> bytes:
    """The container's header for ``writer``; its sync marker is the fingerprint twice."""
    meta = {
        "avro.schema": json.dumps(writer.definition, separators=(",", ":")).encode(),
        "avro.codec": b"null",
        FINGERPRINT_KEY: writer.fingerprint.hex().encode(),
    }
    entries = b"".join(_bytes(k.encode()) + _bytes(v) for k, v in meta.items())
    return MAGIC + _long(len(meta)) + entries + _long(0) + writer.fingerprint * 2


def cut(
    uploads: list[BatchedUpload], max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[list[BatchedUpload]]:
    """The uploads (of one source partition) as runs of one writer schema each, in order,
    each run small enough for one batch message."""
    run: list[BatchedUpload] = []
    size = 0
    for up in uploads:
        body = len(up.value) - HEADER_LEN
        if run and (
            up.value[2:HEADER_LEN] != run[0].value[2:HEADER_LEN] or size + body > max_bytes
        ):
            yield run
            run, size = [], 0
        run.append(up)
        size += body
    if run:
        yield run


def container(writer: Schema, bodies: list[bytes]) -> bytes:
    """An Avro object container file of one block: ``bodies`` (schemaless, by ``writer``)."""
    data = b"".join(bodies)
    return (
        container_header(writer)
        + _long(len(bodies))
        + _long(len(data))
        + data
        + writer.fingerprint * 2
    )


def container_of_blocks(writer: Schema, bodies: list[bytes]) -> bytes:
    """An Avro object container file with one block per body: a reader takes exactly one
    record from each, so a body that holds less or more than one record fails or is cut
    at its own end, and never shifts what the reader takes from the bodies after it."""
    sync = writer.fingerprint * 2
    blocks = b"".join(_long(1) + _long(len(body)) + body + sync for body in bodies)
    return container_header(writer) + blocks


def pack(source: str, writer: Schema, uploads: list[BatchedUpload]) -> tuple[bytes, bytes]:
    """(value, vtp-batch header) of one batch message. ``source``: "topic:partition" the
    uploads were read from; every upload was written with ``writer``."""
    bodies = [up.value[HEADER_LEN:] for up in uploads]
    value = container(writer, bodies)
    sidecar = {
        "v": 1,
        "source": source,
        "offsets": [up.offset for up in uploads],
        "received_ms": [up.received_ms for up in uploads],
        "revisions": [up.revision for up in uploads],
        "keys": [up.key.decode() for up in uploads],
        "lengths": [len(b) for b in bodies],
    }
    return value, json.dumps(sidecar, separators=(",", ":")).encode()


def unpack(value: bytes, header: bytes, store: SchemaStore) -> tuple[str, list[BatchedUpload]]:
    """(source, uploads) of a batch message; FramingError (reason malformed_batch or
    unknown_schema) when it is not one vtp can take apart."""
    try:
        side = json.loads(header)
        source = side["source"]
        columns = [side[k] for k in ("offsets", "received_ms", "revisions", "keys", "lengths")]
    except (ValueError, KeyError, TypeError) as exc:
        raise FramingError(
            "malformed_batch", f"vtp-batch header: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(source, str) or not all(isinstance(c, list) for c in columns):
        raise FramingError(
            "malformed_batch", "vtp-batch header: source or columns of the wrong kind"
        )
    if len({len(c) for c in columns}) != 1:
        raise FramingError("malformed_batch", "vtp-batch header: columns of different lengths")
    numbers = (*columns[:3], columns[4])
    if not all(_is_long(n) for column in numbers for n in column) or not all(
        isinstance(k, str) for k in columns[3]
    ):
        raise FramingError(
            "malformed_batch",
            "vtp-batch header: offsets, times, revisions, lengths must be "
            "64-bit integers and keys text",
        )
    if any(n < 0 for n in columns[4]):
        raise FramingError("malformed_batch", "vtp-batch header: a negative length")
    data = memoryview(value)
    if bytes(data[:4]) != MAGIC:
        raise FramingError("malformed_batch", "not an Avro object container")
    meta, pos = _read_meta(data, 4)
    fp_hex = meta.get(FINGERPRINT_KEY, b"").decode(errors="replace")
    try:
        fp = bytes.fromhex(fp_hex)
    except ValueError:
        fp = b""
    writer = store.by_fingerprint(fp)
    if writer is None:
        raise FramingError("unknown_schema", f"batch writer schema {fp_hex!r} is not in the store")
    if meta.get("avro.codec", b"null") != b"null":
        raise FramingError("malformed_batch", f"codec {meta['avro.codec']!r}; vtp writes null")
    pos += 16  # sync marker
    count, pos = _read_long(data, pos)
    size, pos = _read_long(data, pos)
    lengths = columns[4]
    if count != len(lengths) or size != sum(lengths) or pos + size + 16 != len(data):
        raise FramingError(
            "malformed_batch",
            f"block of {count} records, {size} bytes; the header names {len(lengths)} "
            f"records, {sum(lengths)} bytes",
        )
    prefix = MARKER + writer.fingerprint
    uploads = []
    for offset, received, revision, key, length in zip(*columns, strict=True):
        uploads.append(
            BatchedUpload(
                prefix + data[pos : pos + length], key.encode(), offset, received, revision
            )
        )
        pos += length
    return source, uploads


def _is_long(n: object) -> bool:
    return type(n) is int and -(2**63) <= n < 2**63


def _read_meta(data: memoryview, pos: int) -> tuple[dict[str, bytes], int]:
    meta: dict[str, bytes] = {}
    while True:
        n, pos = _read_long(data, pos)
        if n == 0:
            return meta, pos
        if n < 0:  # a block with its byte size: the size follows
            n = -n
            _, pos = _read_long(data, pos)
        for _ in range(n):
            klen, pos = _read_long(data, pos)
            key = bytes(data[pos : pos + klen]).decode(errors="replace")
            pos += klen
            vlen, pos = _read_long(data, pos)
            meta[key] = bytes(data[pos : pos + vlen])
            pos += vlen

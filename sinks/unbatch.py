"""The validated topic's messages as uploads: batch messages (schemas.envelope) taken apart.

A batch message becomes one ``BatchedMessage`` per upload: it answers what the sink asks
of a Kafka message (key, value, headers, coordinates) with the upload's own key and bytes,
the headers a one-upload message of the worker would have carried, and the batch message's
coordinates, which all its uploads share. A message of one upload (as workers before 0.4
wrote them, or a test writing past the worker) is taken as it is.
"""

from __future__ import annotations

import json
from typing import Any, cast

from confluent_kafka import Message

from schemas import FramingError, SchemaStore
from schemas.envelope import BATCH_HEADER, unpack
from vtp.core import headers as h


class BatchedMessage:
    """One upload of a batch message, shaped as the Kafka message it stands for."""

    __slots__ = ("_headers", "_key", "_of", "_value")

    def __init__(self, of: Message, key: bytes, value: bytes, headers: list[tuple[str, bytes]]):
        self._of, self._key, self._value, self._headers = of, key, value, headers

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def topic(self) -> str | None:
        return self._of.topic()

    def partition(self) -> int | None:
        return self._of.partition()

    def offset(self) -> int | None:
        return self._of.offset()

    def timestamp(self) -> tuple[int, int]:
        return self._of.timestamp()


def batch_header(message: Message) -> bytes | None:
    for name, value in cast("list[tuple[str, Any]]", message.headers() or []):
        if name == BATCH_HEADER:
            return value if isinstance(value, bytes) else None
    return None


def uploads_in(message: Message) -> int:
    """How many uploads a message holds (a batch sink weighs its messages by it)."""
    header = batch_header(message)
    if header is None:
        return 1
    try:
        return max(1, len(json.loads(header)["lengths"]))
    except (ValueError, KeyError, TypeError):
        return 1  # taken apart later, and refused then


def expand(
    messages: list[Message], store: SchemaStore
) -> tuple[list[Message], list[tuple[Message, FramingError]]]:
    """(each upload as a message, batch messages that cannot be taken apart)."""
    out: list[Message] = []
    broken = []
    for m in messages:
        header = batch_header(m)
        if header is None:
            out.append(m)
            continue
        try:
            source, uploads = unpack(m.value() or b"", header, store)
        except FramingError as exc:
            broken.append((m, exc))
            continue
        region = h.header(cast("list[tuple[str, bytes | None]]", m.headers()), h.REGION)
        tag = [(h.REGION, region.encode())] if region is not None else []
        for up in uploads:
            headers = [
                *tag,
                (h.RECEIVED_MS, str(up.received_ms).encode()),
                (h.SOURCE, f"{source}:{up.offset}".encode()),
                (h.REGISTRY_REVISION, str(up.revision).encode()),
            ]
            out.append(cast("Message", BatchedMessage(m, up.key, up.value, headers)))
    return out, broken

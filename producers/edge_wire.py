"""The vehicle edge's wire protocol (v1), shared by the gateway and the vehicle SDK.

A vehicle holds one WebSocket over mutual TLS to its region's gateway (``/v1/uploads``):

- vehicle -> gateway, a binary frame: one single-object Avro ``VehicleUpload``, the bytes
  the gateway publishes to Kafka unchanged (key = the certificate's VIN);
- vehicle -> gateway, the text frame ``{"resume": true}``: it has handled a ``retry``;
- gateway -> vehicle, text frames, one answer per upload:
  ``{"ack": [ids]}`` (in Kafka, acks=all), ``{"retry": [ids], "reason": R,
  "retry_after_ms": N}`` (not stored: send again later, in order), ``{"refused": id,
  "reason": R, "detail": D}`` (never storable: do not send again).

After a ``retry`` the gateway answers every later upload on the connection with
``retry``/``held`` until the vehicle sends ``resume``. Uploads the vehicle had already
sent behind the retried one cannot overtake it that way: Kafka keeps them in order.

The gateway reads only the head of an upload (``read_head``): the framing, the writer
schema's fingerprint, the VIN, the upload id and the first block of samples. Everything
else is the worker's to validate, as for any upload.

This module runs on both sides and imports only the standard library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

PATH = "/v1/uploads"
RESUME = '{"resume": true}'
MARKER = b"\xc3\x01"
HEADER_LEN = 10  # marker + 8-byte fingerprint

# Why the gateway did not take an upload. A retry is the edge's state (send again later);
# a refusal is the upload's (it can never be stored).
RETRY_REASONS = ("rate_limited", "kafka_backlog", "kafka_unavailable", "held", "shutting_down")
REFUSAL_REASONS = (
    "not_single_object",
    "unknown_schema",
    "malformed_avro",
    "vin_mismatch",
    "too_many_samples",
    "bad_upload_id",
    "not_an_upload",
)
# WebSocket close codes the gateway ends a connection with.
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013
CLOSE_REVOKED = 4001
CLOSE_REPLACED = 4002


class EdgeRefusal(ValueError):
    """An upload the edge can tell is not storable; ``upload_id`` when it was readable."""

    def __init__(self, reason: str, detail: str, upload_id: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.upload_id = upload_id


@dataclass(frozen=True)
class UploadHead:
    vin: str
    upload_id: str
    samples: int  # in the first block of the samples array (a writer puts all in one)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro long (zig-zag varint) at ``pos``: its value and the position after it."""
    shift = 0
    raw = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise EdgeRefusal("malformed_avro", "the upload ends inside a number")
        byte = data[pos]
        pos += 1
        raw |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (raw >> 1) ^ -(raw & 1), pos
        shift += 7


def _string(data: bytes, pos: int, what: str, limit: int) -> tuple[str, int]:
    length, pos = _varint(data, pos)
    if length < 0 or length > limit or pos + length > len(data):
        raise EdgeRefusal("malformed_avro", f"the {what} is not a string of at most {limit} bytes")
    try:
        return data[pos : pos + length].decode(), pos + length
    except UnicodeDecodeError:
        raise EdgeRefusal("malformed_avro", f"the {what} is not UTF-8") from None


def read_head(
    frame: bytes,
    fingerprints: Collection[bytes],
    *,
    vin: str,
    max_samples: int,
    max_id_chars: int,
) -> UploadHead:
    """What the edge checks of an upload sent by the vehicle ``vin`` (its certificate's):
    raises EdgeRefusal with the reason, else returns the head."""
    if len(frame) < HEADER_LEN or frame[:2] != MARKER:
        raise EdgeRefusal("not_single_object", "an upload starts with C3 01 and a fingerprint")
    if frame[2:HEADER_LEN] not in fingerprints:
        raise EdgeRefusal(
            "unknown_schema", f"writer schema fingerprint {frame[2:10][::-1].hex()} is not known"
        )
    body_vin, pos = _string(frame, HEADER_LEN, "VIN", 64)
    upload_id, pos = _string(frame, pos, "upload id", 4 * max_id_chars)
    if body_vin != vin:
        raise EdgeRefusal(
            "vin_mismatch", f"the upload is for {body_vin!r}; this certificate is {vin}", upload_id
        )
    if not upload_id or len(upload_id) > max_id_chars:
        raise EdgeRefusal(
            "bad_upload_id", f"an upload id has 1 to {max_id_chars} characters", upload_id
        )
    _, pos = _varint(frame, pos)  # sent_at_ms
    _, pos = _string(frame, pos, "gateway firmware", len(frame))
    count, pos = _varint(frame, pos)
    samples = -count if count < 0 else count  # a negative count is followed by a size
    if samples > max_samples:
        raise EdgeRefusal(
            "too_many_samples",
            f"{samples} samples; an upload holds at most {max_samples}",
            upload_id,
        )
    return UploadHead(vin=body_vin, upload_id=upload_id, samples=samples)


def peek_upload_id(frame: bytes) -> str:
    """The upload id of a framed upload, unchecked (to name it in an answer)."""
    if len(frame) < HEADER_LEN or frame[:2] != MARKER:
        raise EdgeRefusal("not_single_object", "not framed")
    _, pos = _string(frame, HEADER_LEN, "VIN", 64)
    return _string(frame, pos, "upload id", 1024)[0]


def ack_message(upload_ids: Iterable[str]) -> str:
    return json.dumps({"ack": list(upload_ids)})


def retry_message(upload_ids: Iterable[str], reason: str, retry_after_s: float) -> str:
    return json.dumps(
        {
            "retry": list(upload_ids),
            "reason": reason,
            "retry_after_ms": max(1, math.ceil(retry_after_s * 1000)),
        }
    )


def refused_message(upload_id: str, reason: str, detail: str) -> str:
    return json.dumps({"refused": upload_id, "reason": reason, "detail": detail})


@dataclass(frozen=True)
class Answer:
    """One text frame from the gateway, parsed: ``kind`` is ack, retry or refused."""

    kind: str
    upload_ids: tuple[str, ...]
    reason: str = ""
    detail: str = ""
    retry_after_s: float = 0.0


def parse_answer(text: str) -> Answer:
    """A gateway's answer; ValueError for anything else (the vehicle then reconnects)."""
    message: Any = json.loads(text)
    if not isinstance(message, dict):
        raise ValueError(f"not an answer: {text[:80]!r}")
    if isinstance(message.get("ack"), list):
        return Answer("ack", tuple(str(i) for i in message["ack"]))
    if isinstance(message.get("retry"), list):
        after = message.get("retry_after_ms")
        return Answer(
            "retry",
            tuple(str(i) for i in message["retry"]),
            reason=str(message.get("reason", "")),
            retry_after_s=(after if isinstance(after, int | float) and after > 0 else 1000) / 1000,
        )
    if "refused" in message:
        return Answer(
            "refused",
            (str(message["refused"]),),
            reason=str(message.get("reason", "")),
            detail=str(message.get("detail", "")),
        )
    raise ValueError(f"not an answer: {text[:80]!r}")


class TokenBucket:
    """A vehicle's upload allowance: ``rate`` per second, at most ``burst`` at once."""

    __slots__ = ("_at", "_rate", "_tokens", "burst")

    def __init__(self, rate: float, burst: int, now: float):
        self._rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> float:
        """0 when an upload may go now (and counts it); else the seconds until one may."""
        tokens = min(self.burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self._rate

    def full(self, now: float) -> bool:
        return self._tokens + (now - self._at) * self._rate >= self.burst

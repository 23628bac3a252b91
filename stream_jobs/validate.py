"""Validation and residency routing of raw uploads: pure functions, no I/O.

Every raw message of a region's uploads topic gets exactly one Outcome: Routed to the
region's validated topic, DeadLettered with a reason code, or Quarantined because the
vehicle is not registered in this region at the time of its samples. Nothing is ever
forwarded to another region: a vehicle registered elsewhere is quarantined here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas import (
    MAX_ID_CHARS,
    MAX_SAMPLES_PER_UPLOAD,
    MAX_UPLOAD_BYTES,
    FramingError,
    Schema,
    SchemaStore,
)
from schemas.registry import VIN_PATTERN, Registration, refusal
from schemas.signals import Signal, sample_problems, sample_signals


@dataclass(frozen=True)
class RawUpload:
    """One message of the uploads topic, as the broker delivered it."""

    value: bytes
    key: bytes | None
    partition: int
    offset: int
    timestamp_ms: int  # the broker's append time (LogAppendTime): when vtp received it

    @property
    def source(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass(frozen=True)
class Limits:
    max_clock_skew_ms: int
    max_backlog_ms: int
    region: str  # the one region this worker serves
    dedup_per_vehicle: int = 64
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_samples: int = MAX_SAMPLES_PER_UPLOAD


@dataclass(frozen=True)
class Routed:
    region: str
    vin: str
    upload_id: str
    samples: int
    registry_revision: int  # what the sink's own registry copy must have reached
    # The decoded upload, for aggregation in the same pass (never decoded twice).
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class DeadLettered:
    reason: str
    detail: str


@dataclass(frozen=True)
class Quarantined:
    reason: str
    detail: str
    vin: str


Outcome = Routed | DeadLettered | Quarantined


@dataclass
class SeenUploads:
    """Recent upload ids per VIN, with the raw offset each was first seen at.

    The offset is what tells a duplicate (same id, another message) from a replay of
    the same message after a worker restart (same id, same offset): a replay is routed
    again, and the sink's offset-derived deduplication absorbs it. ``load`` fetches a
    VIN's stored history the first time the VIN is met (the worker reads its table).
    """

    load: Callable[[str], dict[str, str]] = lambda vin: {}
    by_vin: dict[str, dict[str, str]] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)

    def _ids(self, vin: str) -> dict[str, str]:
        ids = self.by_vin.get(vin)
        if ids is None:
            ids = self.by_vin[vin] = dict(self.load(vin))
        return ids

    def first_source(self, vin: str, upload_id: str) -> str | None:
        return self._ids(vin).get(upload_id)

    def remember(self, vin: str, upload_id: str, source: str, keep: int) -> None:
        ids = self._ids(vin)
        ids[upload_id] = source
        while len(ids) > keep:  # dicts keep insertion order: drop the oldest
            del ids[next(iter(ids))]
        self.changed.add(vin)


def check_record(
    record: Mapping[str, Any], signals: Mapping[str, Signal], received_ms: int, limits: Limits
) -> DeadLettered | None:
    """Content rules of one decoded upload; None when it is valid."""
    vin = record["vin"]
    if not VIN_PATTERN.match(vin):
        return DeadLettered("invalid_vin", f"{vin[:40]!r} is not a 17-character VIN")
    for name in ("upload_id", "gateway_firmware"):
        if not 0 < len(record[name]) <= MAX_ID_CHARS:
            return DeadLettered(
                "invalid_field", f"{name} has {len(record[name])} characters (1 to {MAX_ID_CHARS})"
            )
    samples = record["samples"]
    if not samples:
        return DeadLettered("empty_upload", f"upload {record['upload_id']} has no samples")
    if len(samples) > limits.max_samples:
        return DeadLettered(
            "too_many_samples",
            f"{len(samples)} samples; an upload holds at most {limits.max_samples}",
        )
    sent = record["sent_at_ms"]
    if sent > received_ms + limits.max_clock_skew_ms:
        return DeadLettered(
            "clock_skew",
            f"sent_at_ms {sent} is {(sent - received_ms) / 1000:.1f} s after it was received",
        )
    previous_seq = -1
    ranges = _ranges(signals)
    for i, sample in enumerate(samples):
        # Avro already guaranteed the types; ranges (and NaN) are what is left to check.
        for name, low, high in ranges:
            value = sample.get(name)
            if value is not None and not (low <= value <= high):
                problems = sample_problems(sample, signals)
                return DeadLettered("invalid_sample", f"sample {i}: " + "; ".join(problems))
        t = sample["event_time_ms"]
        if t > sent + limits.max_clock_skew_ms:
            return DeadLettered(
                "clock_skew",
                f"sample {i} event_time_ms {t} is {(t - sent) / 1000:.1f} s after sent_at",
            )
        if t < sent - limits.max_backlog_ms:
            return DeadLettered(
                "too_old", f"sample {i} is {(sent - t) / 86400000:.1f} days older than sent_at"
            )
        if sample["seq"] <= previous_seq:
            return DeadLettered(
                "invalid_sample", f"sample {i} seq {sample['seq']} does not increase"
            )
        previous_seq = sample["seq"]
    return None


def route_upload(
    raw: RawUpload,
    store: SchemaStore,
    registry: Mapping[str, Registration],
    seen: SeenUploads,
    limits: Limits,
) -> Outcome:
    """Decide where one raw message goes. Updates ``seen`` for routed uploads."""
    if len(raw.value) > limits.max_upload_bytes:
        # Judged before decoding: its weight is the problem, whatever it holds.
        return DeadLettered(
            "too_large", f"{len(raw.value)} bytes; an upload is at most {limits.max_upload_bytes}"
        )
    try:
        record, writer = store.decode(raw.value)
    except FramingError as exc:
        return DeadLettered(exc.reason, exc.detail)
    if writer.name != "vtp.telemetry.VehicleUpload":
        return DeadLettered("unexpected_schema", f"{writer.name} is not a VehicleUpload")
    rejected = check_record(record, _signals(writer, store), raw.timestamp_ms, limits)
    if rejected:
        return rejected
    vin, upload_id = record["vin"], record["upload_id"]
    if raw.key is None:
        # Uploads are partitioned by VIN so that a vehicle's registry entry, dedup and
        # session state sit with its uploads; an unkeyed message would land anywhere.
        return DeadLettered("missing_key", f"the message has no key; it must be the VIN {vin}")
    if raw.key != vin.encode():
        return DeadLettered("key_mismatch", f"message key {raw.key!r} is not the VIN {vin}")
    first = seen.first_source(vin, upload_id)
    if first is not None and first != raw.source:
        return DeadLettered("duplicate_upload", f"upload {upload_id} was first seen at {first}")
    registration = registry.get(vin)
    times = [s["event_time_ms"] for s in record["samples"]]
    if registration is None or not any(registration.here(limits.region, t) for t in times):
        # Judged by the newest sample: what the vehicle's registration says now.
        reason, detail = refusal(registration, limits.region, max(times)) or ("", "")
        return Quarantined(reason, f"{vin}: {detail}", vin)
    seen.remember(vin, upload_id, raw.source, limits.dedup_per_vehicle)
    return Routed(limits.region, vin, upload_id, len(times), registration.revision, record)


def route_batch(
    raws: list[RawUpload],
    store: SchemaStore,
    registry: Mapping[str, Registration],
    seen: SeenUploads,
    limits: Limits,
) -> list[Outcome]:
    return [route_upload(raw, store, registry, seen, limits) for raw in raws]


_SIGNALS_CACHE: dict[bytes, dict[str, Signal]] = {}


def _ranges(signals: Mapping[str, Signal]) -> list[tuple[str, float, float]]:
    return [
        (
            s.name,
            s.minimum if s.minimum is not None else float("-inf"),
            s.maximum if s.maximum is not None else float("inf"),
        )
        for s in signals.values()
        if s.kind in ("float", "double", "int", "long")
    ]


def _signals(writer: Schema, store: SchemaStore) -> dict[str, Signal]:
    signals = _SIGNALS_CACHE.get(writer.fingerprint)
    if signals is None:
        signals = _SIGNALS_CACHE[writer.fingerprint] = sample_signals(writer)
    return signals

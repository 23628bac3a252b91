"""What the sink may store of a batch's uploads, and under whom. Pure.

``screen`` refuses by the message's headers (untagged, tagged for another region);
``judge`` decodes what passed and splits it by owner: every sample is stored under the
owner registered here at its event time, samples of no period registered here are
quarantined; ``sort_against_stored`` tells resends from replays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

from confluent_kafka import Message

from schemas import FramingError, default_store
from schemas.registry import Registration, refusal
from sinks import rows as rowlib
from vtp.core import headers as h
from vtp.core.kafka import coordinates

# upload_id -> (raw_source, topic, partition, offset) of the copy already stored
StoredCopies = dict[str, tuple[str, str, int, int]]


@dataclass(frozen=True)
class Refused:
    message: Message
    reason: str
    detail: str
    source: str
    quarantine: bool = False  # not registered here: quarantine, not the dead-letter topic
    partial: int | None = None  # this many samples refused; the message's others are stored


def header(message: Message, name: str) -> str | None:
    # A consumed message's headers are (name, bytes or None) pairs; the stubs give the wider
    # type produce() takes.
    return h.header(cast("list[tuple[str, bytes | None]] | None", message.headers()), name)


def source(message: Message) -> str:
    """Where an upload first reached Kafka: topic:partition:offset of its raw message."""
    return header(message, h.SOURCE) or "{}:{}:{}".format(*coordinates(message))


def split_by_owner(
    upload: rowlib.StoredUpload, registration: Registration | None, region: str
) -> tuple[list[rowlib.StoredUpload], list[dict[str, Any]]]:
    """(one piece per owner registered here at its samples' times, samples of nobody here).

    A piece whose owner's period ended before the upload was sent or received (sent after
    a sale) carries those times clamped to the end of the period: the seller learns
    nothing about a moment that is the buyer's."""
    by_owner: dict[str, list[dict[str, Any]]] = {}
    ends: dict[str, set[int | None]] = {}
    outside = []
    for sample in upload.record["samples"]:
        period = registration.here(region, sample["event_time_ms"]) if registration else None
        if period is None or registration is None:
            outside.append(sample)
            continue
        owner = period.owner_id or ""
        by_owner.setdefault(owner, []).append(sample)
        ends.setdefault(owner, set()).add(registration.end_of(period))
    pieces = []
    for owner, samples in by_owner.items():
        record = {**upload.record, "samples": samples}
        received = upload.received_ms
        if None not in ends[owner]:  # the owner's time here has ended
            last = max(e for e in ends[owner] if e is not None) - 1
            record["sent_at_ms"] = min(record["sent_at_ms"], last)
            received = min(received, last)
        pieces.append(replace(upload, owner_id=owner, record=record, received_ms=received))
    return pieces, outside


def received_ms(message: Message) -> int:
    """When the upload reached vtp (the raw message's broker time)."""
    return int(header(message, h.RECEIVED_MS) or message.timestamp()[1])


def screen(messages: list[Message], region: str) -> tuple[list[Message], list[Refused]]:
    """(messages of uploads tagged for ``region``, the others refused by their headers);
    control messages (signals for the aggregation, not data) are neither."""
    tagged, refused = [], []
    for m in messages:
        if header(m, h.CONTROL) is not None:
            continue
        tag = header(m, h.REGION)
        if tag is None:
            refused.append(Refused(m, "untagged", "no vtp-region header", source(m)))
        elif tag != region:
            detail = f"tagged {tag!r}, refused by the {region!r} sink"
            refused.append(Refused(m, "residency_mismatch", detail, source(m)))
        else:
            tagged.append(m)
    return tagged, refused


def judge(
    tagged: list[Message], region: str, registry: Mapping[str, Registration]
) -> tuple[list[rowlib.StoredUpload], list[Refused]]:
    """Decode screened uploads and split them by owner; refuse what cannot be decoded and
    quarantine the samples of no period registered here."""
    store = default_store()
    good, refused = [], []
    for m in tagged:
        where = source(m)
        try:
            record, writer = store.decode(m.value() or b"")
        except FramingError as exc:
            refused.append(Refused(m, exc.reason, exc.detail, where))
            continue
        if any(s["seq"] < 0 for s in record["samples"]):  # the worker never routes one
            refused.append(Refused(m, "invalid_sample", "a negative seq", where))
            continue
        topic, partition, offset = coordinates(m)
        upload = rowlib.StoredUpload(
            record=record,
            owner_id="",
            region=region,
            schema_version=writer.version,
            received_ms=received_ms(m),
            raw_source=where,
            topic=topic,
            partition=partition,
            offset=offset,
        )
        registration = registry.get(record["vin"])
        pieces, outside = split_by_owner(upload, registration, region)
        if outside:
            reason, detail = refusal(registration, region, outside[-1]["event_time_ms"]) or ("", "")
            seqs = [s["seq"] for s in outside]
            detail = f"{record['vin']}: {detail}; {len(seqs)} of {len(record['samples'])} samples, seq {seqs[:20]}"
            partial = len(seqs) if pieces else None
            refused.append(Refused(m, reason, detail, where, quarantine=True, partial=partial))
        good += pieces
    return good, refused


def sort_against_stored(
    uploads: list[rowlib.StoredUpload], stored: StoredCopies
) -> tuple[list[rowlib.StoredUpload], list[rowlib.StoredUpload], int]:
    """Split uploads into (to insert, resends to refuse, worker replays skipped).

    ``stored`` maps upload_id -> (raw_source, topic, partition, offset) of the copy
    already in the warehouse. The same raw message at the same validated offset again is
    a sink replay and is inserted again (its token makes that a no-op); the same raw
    message at another validated offset is a worker replay, skipped; another raw message
    with a stored upload id is a resend, refused as duplicate_upload (even in the same
    batch message). The pieces of one upload (one per owner) share both and are inserted
    together.
    """
    seen = dict(stored)
    fresh, resends, skipped = [], [], 0
    for up in uploads:
        uid = up.record["upload_id"]
        prior = seen.get(uid)
        here = (up.raw_source, up.topic, up.partition, up.offset)
        if prior is None or prior == here:
            fresh.append(up)
            seen.setdefault(uid, here)
        elif prior[0] == up.raw_source:
            skipped += 1
        else:
            resends.append(up)
    return fresh, resends, skipped

"""Kafka header names vtp writes, and the dead-letter/quarantine headers in one place."""

from __future__ import annotations

REGION = "vtp-region"  # the region the worker routed an upload in
RECEIVED_MS = "vtp-received-ms"  # the broker's append time of the raw upload
SOURCE = "vtp-source"  # where the message first reached Kafka: topic:partition:offset
REGISTRY_REVISION = "vtp-registry-revision"  # the registry revision the worker decided with
CONTROL = "vtp-control"  # not data: a signal on a data topic, one of:
REGISTRY_CONTROL = b"registry"  # a vehicle's registration changed (sent by the worker)
ERASURE_CONTROL = b"erasure"  # an owner erased (sent by owner_api.worker_notice)
# On an erasure control message: whose data to forget, and up to when (the erasure's time).
ERASED_OWNER, ERASURE_HORIZON_MS = "vtp-erased-owner", "vtp-erasure-horizon-ms"
STAGE, REASON, DETAIL = "vtp-stage", "vtp-reason", "vtp-detail"
# On a quarantine record that holds only some samples of a message whose other samples
# were stored: the message's outcome is "stored", this record keeps the rest.
PARTIAL = "vtp-partial"
# On a dead letter whose value is only the start of the original (which was too large to
# copy): the original's size; the original stays at vtp-source until retention.
TRUNCATED = "vtp-truncated"

DETAIL_MAX = 2000
KEEP_BYTES = 64 * 1024  # of an original too large to copy whole


def kept(value: bytes, limit: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value a dead letter carries: the original when it is at most ``limit`` bytes,
    else its first KEEP_BYTES and a header with the original's size."""
    if len(value) <= limit:
        return value, []
    return value[:KEEP_BYTES], [(TRUNCATED, str(len(value)).encode())]


def deadletter_headers(
    stage: str, reason: str, detail: str, source: str, partial: int | None = None
) -> list[tuple[str, bytes]]:
    headers = [
        (STAGE, stage.encode()),
        (REASON, reason.encode()),
        (DETAIL, detail[:DETAIL_MAX].encode()),
        (SOURCE, source.encode()),
    ]
    if partial is not None:
        headers.append((PARTIAL, str(partial).encode()))
    return headers


def header(headers: list[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for key, value in headers or []:
        if key == name and value is not None:
            return value.decode(errors="replace")
    return None

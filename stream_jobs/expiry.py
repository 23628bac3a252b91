"""Forgetting vehicles gone quiet, so the worker's per-vehicle state stays bounded.

A vehicle whose last upload reached vtp more than ``VTP_VEHICLE_STATE_TTL_S`` ago has
its entries removed (a tombstone in the changelog, so compaction drops them from Kafka
too); its open trip, charge and days close final first. The TTL is at least the oldest
sample vtp accepts (``VTP_MAX_BACKLOG_S`` + ``VTP_MAX_CLOCK_SKEW_S``), so a vehicle that
comes back sends nothing older than what its forgotten state had released.

A table is swept right after a checkpoint has written it (``stream_jobs.checkpoint``: the
table then holds what the worker's memory does), under the lock that keeps batches out,
a slice of keys at a time so a large table never holds up the stream, and only keys of
partitions the worker is assigned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

import faust
from aiokafka.partitioner import murmur2

from stream_jobs.faust_fixes import put_durably
from vtp.core import metrics

SLICE = 2000  # keys looked at between two batches


def is_quiet(touched_ms: int | None, now_ms: int, ttl_ms: int) -> bool:
    """Was the vehicle last heard of more than ``ttl_ms`` ago? Never with a TTL of 0, or
    for an entry that does not say when (written before vtp recorded it)."""
    return ttl_ms > 0 and touched_ms is not None and now_ms - touched_ms > ttl_ms


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives ``key``: the one the
    vehicle's messages, and so its table entries, live on."""
    hashed: int = murmur2(key)  # aiokafka has no annotations
    return (hashed & 0x7FFFFFFF) % partitions


class QuietSweep:
    """Hands out a table's keys a slice at a time; a new pass starts at most once per
    ``every_s`` (a snapshot of the keys then)."""

    def __init__(self, every_s: float, slice_keys: int = SLICE):
        self._every_s, self._slice = every_s, slice_keys
        self._pending: list[bytes] = []
        self._next_pass = 0.0

    def due(self, keys: Callable[[], Iterable[bytes]], now_s: float) -> list[bytes]:
        if not self._pending:
            if now_s < self._next_pass:
                return []
            self._pending = list(keys())
            self._next_pass = now_s + self._every_s
        chunk = self._pending[-self._slice :]
        del self._pending[-self._slice :]
        return chunk


def sweep_interval_s(ttl_s: float) -> float:
    """How often a pass starts: often enough that an entry outlives its TTL by at most a
    tenth of it, and at most every ten minutes."""
    return max(1.0, min(600.0, ttl_s / 10))


async def forget_quiet(
    table: faust.Table[bytes, bytes],
    sweep: QuietSweep,
    *,
    ttl_ms: int,
    partitions: int,
    assigned: set[int],
    touched_of: Callable[[bytes], int | None],
    closing: Callable[[bytes, bytes], Awaitable[None]] | None = None,
) -> int:
    """Remove the quiet entries among the sweep's next slice, each durably (the
    changelog's tombstone acknowledged); ``closing(key, value)`` runs first (and its
    sends are acknowledged). Returns how many went."""
    if ttl_ms <= 0:
        return 0
    now_ms = int(time.time() * 1000)
    quiet = []
    for key in sweep.due(table.keys, time.monotonic()):
        partition = key_partition(key, partitions)
        if partition not in assigned:
            continue
        value = table.get(key)
        if value is not None and is_quiet(touched_of(value), now_ms, ttl_ms):
            quiet.append((key, value, partition))
    if closing is not None:
        for key, value, _ in quiet:
            await closing(key, value)
    await asyncio.gather(*(put_durably(table, key, None, p) for key, _, p in quiet))
    metrics.STATES_EXPIRED.labels(table.name).inc(len(quiet))
    return len(quiet)

"""Fixes to faust-streaming 0.15.3 and aiokafka 0.14.0 that the worker needs to process
every record once and commit only what it processed. Why each exists, what it was seen
doing and the upstream issue: docs/adr/0001-faust-fixes.md.

- seek before resume: ``_recovery_completed_seeking_first`` (faust#596)
- fetch what was active when the fetch began: ``_wait_next_records_on_a_copy`` (no
  upstream issue yet)
- durable table writes: ``put_durably`` (the rest of faust#273)
- exit on agent error: ``exit_on_error`` (faust#527)
- no gaps on plain topics: ``refuse_gaps_on``, ``_add_gap_unless_gapless`` (faust#606)
- commit only processed runs: ``_new_offset_from_committed`` (faust#606, faust#707)
- commit only what a checkpoint covers: ``commit_below`` (vtp's own need, not a bug)
- producer tracks every topic: ``_wait_on_metadata_tracking`` (no upstream issue yet)
- short fetch wait: ``_worker_consumer_waiting_less`` (no upstream issue yet)
- stall watchdog: ``StallWatch`` (faust#629)

A worker that must start again exits for its supervisor (``exit_for_restart``).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aiokafka
import faust
from aiokafka.client import AIOKafkaClient
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

FIXED_VERSION = "0.15.3"
FIXED_AIOKAFKA_VERSION = "0.14.0"
# The originals, taken at import (before install() replaces them): the tests show what
# each one does wrong, so a library upgrade that fixes it shows up as a failing test.
_faust_on_recovery_completed = Recovery.on_recovery_completed
_faust_wait_next_records = Consumer._wait_next_records
_faust_new_offset = Consumer._new_offset
EXIT_AGENT_FAILED = 70  # EX_SOFTWARE
log = logging.getLogger("vtp.worker")


def internals(consumer: object) -> Any:
    """Faust's consumer with the private bookkeeping the fixes, the watchdog and the flow
    log read (``_acked``, ``_committed_offset``, ``_read_offset``, ``_thread``…), which
    Faust's types do not declare."""
    return consumer


def _exit(code: int) -> None:  # replaced in tests
    logging.shutdown()
    os._exit(code)  # now: no finally, no ack, no commit


async def _seek_then_resume_streams(self: Recovery) -> None:
    consumer = self.app.consumer
    assignment = consumer.assignment()
    streams = {tp for tp in assignment if not self._is_changelog_tp(tp)}
    if assignment:
        self.log.info("Seek stream partitions to committed offsets.")
        await self._wait(consumer.perform_seek(), timeout=self.app.conf.broker_request_timeout)
        # A partition the group never committed keeps whatever position the restore
        # left it at, and was then never fetched (the worker looked ready and read
        # nothing): start it at offset 0 (if retention removed that, the consumer's
        # auto_offset_reset=earliest takes over).
        for tp in sorted(streams):
            if internals(consumer)._committed_offset[tp] is None:
                await self._wait(consumer.seek(tp, 0), timeout=self.app.conf.broker_request_timeout)
    consumer.resume_partitions(streams)


async def _recovery_completed_seeking_first(self: Recovery, generation_id: int = 0) -> None:
    # Upstream's Recovery.on_recovery_completed (after restoring changelogs, the fetcher
    # running), with the seek moved before resume_partitions.
    app = self.app
    self.log.info("Restore complete!")
    await app.on_rebalance_complete.send()
    self._set_recovery_ended()
    completions = [
        asyncio.ensure_future(
            table.on_recovery_completed(
                self.actives_for_table[table], self.standbys_for_table[table]
            )
        )
        for table in self.tables.values()
    ]
    if completions:
        await asyncio.wait(completions)
    if app.consumer_generation_id != generation_id:
        self.log.warning(
            "Recovery rebalancing again app id %s param %s",
            app.consumer_generation_id,
            generation_id,
        )
        return
    await _seek_then_resume_streams(self)
    self.completed.set()
    app.flow_control.resume()
    app.consumer.resume_flow()
    await cast(Any, app)._fetcher.maybe_start()
    self.tables.on_actives_ready()
    if not app.assignor.assigned_standbys():
        self.tables.on_standbys_ready()
    app.on_rebalance_end()
    self.log.info("Worker ready")


async def _wait_next_records_on_a_copy(self: Consumer, timeout: float) -> tuple[Any, Any]:
    # Upstream hands the consumer thread its live set of active partitions, which the
    # recovery empties ("Done reading from changelog topics") while a fetch waits on it;
    # aiokafka reads an empty set as "every partition" and hands over the uploads too,
    # moving its position past them, and Faust drops them as inactive. The seek to the
    # committed offsets had already happened, so the restarted worker never saw them and
    # its watchdog restarted it again (tests/e2e/test_worker_watchdog.py). The thread gets
    # a copy taken when the fetch begins; Faust filters what comes back on the live set.
    if not self.flow_active:
        await self.wait(self.can_resume_flow)  # type: ignore[arg-type]
    try:
        self.not_waiting_next_records.set()
        if self.app.client_only:
            return await self._getmany(active_partitions=None, timeout=timeout), None
        active = self._get_active_partitions()
        fetching = frozenset(active)
        if not fetching:
            await self.sleep(1)  # as upstream: nothing to fetch, yield to the loop
            return {}, active
        return await self._getmany(active_partitions=cast(Any, fetching), timeout=timeout), active
    finally:
        self.not_waiting_next_records.set()


def install() -> None:
    """Apply the fixes that replace library methods; refuses (before patching anything)
    any other Faust or aiokafka than the ones they were written against."""
    if faust.__version__ != FIXED_VERSION:
        raise RuntimeError(
            f"stream_jobs/faust_fixes.py patches faust-streaming {FIXED_VERSION}, found "
            f"{faust.__version__}: check whether Recovery.on_recovery_completed still resumes "
            "stream partitions before seeking them, then update or drop the fix"
        )
    if aiokafka.__version__ != FIXED_AIOKAFKA_VERSION:
        raise RuntimeError(
            f"stream_jobs/faust_fixes.py patches aiokafka {FIXED_AIOKAFKA_VERSION}, found "
            f"{aiokafka.__version__}: check whether a send still leaves a topic the "
            "metadata knows out of the client's refreshed topics, then update or drop that fix"
        )
    Recovery.on_recovery_completed = _recovery_completed_seeking_first  # type: ignore[method-assign]
    Consumer._wait_next_records = _wait_next_records_on_a_copy  # type: ignore[method-assign]
    Consumer._add_gap = _add_gap_unless_gapless  # type: ignore[method-assign]
    Consumer._new_offset = _new_offset_from_committed  # type: ignore[method-assign]
    AIOKafkaClient._wait_on_metadata = _wait_on_metadata_tracking
    AIOKafkaConsumerThread._create_worker_consumer = _worker_consumer_waiting_less  # type: ignore[method-assign]


# -- short fetch wait ---------------------------------------------------------------

# aiokafka keeps one fetch request in flight per broker, for the assigned partitions
# that have no records waiting to be consumed. When those are idle ones (the registry,
# the control topic) the broker holds the request for up to fetch_max_wait_ms, and the
# uploads that arrive meanwhile wait for it to return: Faust hard-codes 1500 ms, which
# measured as ~0.85 s median and 2 s p99 from the broker to the worker's batch at half
# load (100 ms: 0.34 s and 0.94 s; python -m bench.throughput).
FETCH_MAX_WAIT_MS = 100

_faust_create_worker_consumer = AIOKafkaConsumerThread._create_worker_consumer  # unpatched


def _worker_consumer_waiting_less(self: AIOKafkaConsumerThread, transport: Any) -> Any:
    consumer = _faust_create_worker_consumer(self, transport)
    consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts
    return consumer


# -- producer tracks every topic --------------------------------------------------

_aiokafka_wait_on_metadata = AIOKafkaClient._wait_on_metadata  # unpatched, at import


async def _wait_on_metadata_tracking(self, topic: str):
    # Added without forcing a refresh: the cluster metadata already has it, and the next
    # refresh (periodic or forced) asks for it along with the others.
    self._topics.add(topic)
    return await _aiokafka_wait_on_metadata(self, topic)


# -- no gaps on plain topics; commit only processed runs -----------------------------

_gapless_topics: set[str] = set()
_commit_limits: dict[str, Callable[[int], int]] = {}
_faust_add_gap = Consumer._add_gap  # unpatched, at import


def refuse_gaps_on(*topics: str) -> None:
    """Plain (not compacted, not transactional) topics: offsets never skip there."""
    _gapless_topics.update(topics)


def commit_below(topic: str, limit: Callable[[int], int]) -> None:
    """Offsets of ``topic`` are committed only below ``limit(partition)``: the worker's
    state checkpoints cover them (stream_jobs.checkpoint). Acked offsets above it wait,
    and are committed once the limit passes them."""
    _commit_limits[topic] = limit


async def _add_gap_unless_gapless(self, tp, offset_from: int, offset_to: int) -> None:
    # Faust calls this with (last read + 1, offset of the record that arrived), just
    # before it hands that record to the agents.
    if tp.topic in _gapless_topics:
        earliest = (await self.earliest_offsets(tp)).get(tp)
        if earliest is not None and earliest >= offset_to:
            # Retention deleted the skipped records (a worker down that long): nothing
            # is there to read, so Faust's gap is right.
            log.warning(
                "%s:%s: offsets %d..%d were deleted by retention before this worker read them",
                tp.topic,
                tp.partition,
                offset_from,
                offset_to - 1,
            )
            await _faust_add_gap(self, tp, offset_from, offset_to)
            return
        log.critical(
            "%s:%s: record %d arrived after %d, offsets %d..%d were skipped; exiting for "
            "the supervisor to restart the worker before it processes that record, so the "
            "skipped records are read first",
            tp.topic,
            tp.partition,
            offset_to,
            offset_from - 1,
            offset_from,
            offset_to - 1,
        )
        exit_for_restart()
        return
    await _faust_add_gap(self, tp, offset_from, offset_to)


def _new_offset_from_committed(self, tp) -> int | None:
    """The offset to commit for ``tp``: one past the run of acked offsets that starts at
    the committed offset (Faust's gaps count as acked), cut at the topic's commit limit;
    None when that offset itself is not acked yet (or not below the limit). Replaces
    Consumer._new_offset (faust-streaming 0.15.3)."""
    acked: list[int] = self._acked[tp]
    if not acked:
        return None
    gaps = self._gap[tp]
    if gaps:
        ranges = sorted(gaps.overlap(0, max(acked)), key=lambda r: r.begin)
        if ranges:
            filled = [o for r in ranges for o in range(r.begin, r.end)]
            acked.extend(filled)
            gaps.chop(0, max(filled[-1], max(acked) + 1))
    acked.sort()
    committed = self._committed_offset[tp]
    if committed is not None:
        done = bisect.bisect_left(acked, committed)  # acked again after a seek back
        if done:
            self._acked_index[tp].difference_update(acked[:done])
            del acked[:done]
        if not acked or acked[0] != committed:
            return None
    end = 1
    while end < len(acked) and acked[end] == acked[end - 1] + 1:
        end += 1
    limit = _commit_limits.get(tp.topic)
    if limit is not None:
        end = bisect.bisect_left(acked, limit(tp.partition), 0, end)
        if not end:
            return None
    run = acked[:end]
    del acked[:end]
    self._acked_index[tp].difference_update(run)
    return run[-1] + 1


async def put_durably(
    table: faust.Table, key: bytes, value: bytes | None, partition: int | None = None
) -> None:
    """table[key] = value (None: delete the key), returning once its changelog write is
    acknowledged (durable table writes).

    ``partition``: the changelog partition, i.e. the source partition the key's
    messages arrive on; None lets the producer's partitioner choose, for which Faust
    needs the changelog topic's metadata at hand (it does not wait for it)."""
    if partition is None:
        producer = cast(Any, table.app.producer)._ensure_producer()
        await producer.partitions_for(table.changelog_topic.get_topic_name())
    if value is None:
        table.data.pop(key, None)
        await table.send_changelog(partition, key, None, value_serializer="raw")
    else:
        table.data[key] = value
        await table.send_changelog(partition, key, value)


def exit_on_error(agent: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Exit on agent error: Faust acks a take_events() batch even when the agent body raised, and then
    restarts the agent, so the batch would be lost. An agent wrapped in this ends the
    worker instead, before the acks can be committed; its batch is read again on restart.
    A timer wrapped in this (one that writes state) ends the worker too, rather than
    leave a checkpoint half done and go on."""

    @functools.wraps(agent)
    async def guarded(*args: Any) -> None:
        try:
            await agent(*args)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.critical(
                "agent %s failed; exiting so its batch is processed again",
                agent.__name__,
                exc_info=True,
            )
            logging.shutdown()
            _exit(EXIT_AGENT_FAILED)

    return guarded


# -- stall watchdog: a worker whose offsets stopped moving with work outstanding ------


@dataclass
class StallWatch:
    stall_after_s: float
    since: dict[Any, tuple[tuple[int | None, int | None], float]] = field(default_factory=dict)

    def stalled(
        self, progress: dict[Any, tuple[int | None, int | None, int | None, int]], now: float
    ) -> list[Any]:
        """Partitions with work outstanding whose position has not moved for
        ``stall_after_s``. ``progress``: partition -> (read offset, committed offset,
        high-water, acked offsets not yet committed). Faust's read offset is the last
        offset read, or after a seek the next one to read. Outstanding: records not yet
        read, or read but not committed (a producer that stops draining blocks Faust's
        commits, which flush it first)."""
        stuck = []
        for tp, (read, committed, high, acked) in progress.items():
            unread = high is not None and high > (-1 if read is None else read) + 1
            uncommitted = acked > 0 or (
                read is not None and committed is not None and read > committed
            )
            seen = self.since.get(tp)
            if not (unread or uncommitted) or seen is None or seen[0] != (read, committed):
                self.since[tp] = ((read, committed), now)
            elif now - seen[1] >= self.stall_after_s:
                stuck.append(tp)
        for tp in set(self.since) - set(progress):
            del self.since[tp]
        return stuck


EXIT_RESTART = 75  # EX_TEMPFAIL: start me again


def exit_for_restart() -> None:
    """End the worker now, asking its supervisor to start it again: nothing more is
    processed or committed, and a fresh process reads on from the committed offsets.
    Exiting (rather than replacing the process from inside Faust) lets the supervisor
    count restarts, so a crash loop is visible where the worker runs."""
    _exit(EXIT_RESTART)

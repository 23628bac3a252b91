"""Fixes to faust-streaming that the worker needs to survive a restart with a backlog.

1. After restoring tables, recovery resumes the stream partitions *before* it seeks
   them to their committed offsets (faust/tables/recovery.py:
   Recovery.on_recovery_completed). The fetcher is already running at that point
   (_resume_streams, used when nothing needed restoring, runs with the flow stopped and
   is left alone), so records fetched between the resume and the seek
   reach the agents, and after the seek the same offsets arrive again. Both copies are acked; Faust's commit bookkeeping then
   holds one offset twice and finds a "gap" after every one of them, so the committed
   offset creeps forward by one or two per commit interval, or stops for good. Seen
   here as a worker whose lag never drained after a SIGKILL and restart
   (tests/integration/test_aggregation.py). The fix seeks first, then resumes.

2. Faust's commit drains its send buffer only until that buffer has been idle for
   0.1 s (ProducerBuffer.flush_atmost), so on a busy worker offsets can be committed
   before the table writes of the same batch reach the changelog; a SIGKILL then loses
   state that the committed offsets rely on. `put_durably` returns the changelog
   write's delivery future so an agent can await it before its batch is acked.

3. An exception in an agent body still acks its take_events() batch (the generator's
   finally), and Faust then restarts the agent: the batch is lost. `exit_on_error` ends
   the worker instead, so the batch is read again after a restart.

4. A watchdog restarts a worker whose fetcher stopped delivering (see StallWatch).
   Fix 1 also seeks stream partitions the group never committed to the beginning.

5. When a record arrives more than one offset past the last one read, Faust records
   the offsets in between as a "gap" and counts them as processed (right for compacted
   or transactional topics, whose offsets skip). On the worker's plain topics a skip
   means records were delivered out of order, and the late records themselves are then
   dropped as already read. Seen after restarts: validated.eu:0 delivered 808 right
   after 247; in another run three hours of one vehicle's uploads were never aggregated
   although their offsets were committed. Processing the later record first would be
   wrong anyway (aggregation takes an upload older than one it applied for a replay), so
   on the worker's plain topics (`refuse_gaps_on`) the worker restarts in place before
   that record reaches an agent; nothing past the hole is committed, and the hole is
   read first after the restart. Faust's commit also committed past an unprocessed
   offset: it only checks that the first acked offset is
   at most one past the committed one (Consumer._new_offset, an off-by-one: the
   committed offset is the next to process) and skips the check when nothing was
   committed yet or the committed offset is 0. `_new_offset_from_committed` commits
   only a run of acked offsets that starts exactly at the committed offset.

6. aiokafka's producer (0.14.0) stops for good on a topic its metadata forgot: a send
   to a topic the cluster metadata already knows does not add it to the topics the
   client refreshes (`AIOKafkaClient._wait_on_metadata`). While that list is empty a
   refresh fetches every topic; once any other topic is added it fetches only the
   listed ones, the others drop out of the metadata, and their queued batches wait for
   a leader that is never looked up (until the 20-minute request timeout). Seen as a
   worker whose sends and commits (which flush the producer) hung with batches for
   validated.* and deadletter partitions, leader None, 67 s old. Every topic sent to is
   now tracked.

Fixes 1, 5 and 6 replace method bodies, so they are tied to the pinned versions.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aiokafka
import faust
from aiokafka.client import AIOKafkaClient
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer

FIXED_VERSION = "0.15.3"
EXIT_AGENT_FAILED = 70  # EX_SOFTWARE
log = logging.getLogger("vtp.worker")


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
            if consumer._committed_offset[tp] is None:
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
            f"Recovery rebalancing again app id {app.consumer_generation_id} param {generation_id}"
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


def install() -> None:
    """Apply fix 1; refuses any other Faust than the one it was written against."""
    if faust.__version__ != FIXED_VERSION:
        raise RuntimeError(
            f"stream_jobs/faust_fixes.py patches faust-streaming {FIXED_VERSION}, found "
            f"{faust.__version__}: check whether Recovery.on_recovery_completed still resumes "
            "stream partitions before seeking them, then update or drop the fix"
        )
    Recovery.on_recovery_completed = _recovery_completed_seeking_first  # type: ignore[method-assign]
    Consumer._add_gap = _add_gap_unless_gapless  # type: ignore[method-assign]
    Consumer._new_offset = _new_offset_from_committed  # type: ignore[method-assign]
    if aiokafka.__version__ != FIXED_AIOKAFKA_VERSION:
        raise RuntimeError(
            f"stream_jobs/faust_fixes.py patches aiokafka {FIXED_AIOKAFKA_VERSION}, found "
            f"{aiokafka.__version__}: check whether a send still leaves a topic the "
            "metadata knows out of the client's refreshed topics, then update or drop fix 6"
        )
    AIOKafkaClient._wait_on_metadata = _wait_on_metadata_tracking  # type: ignore[method-assign]


# -- fix 6: the producer's metadata keeps every topic it sends to ---------------------

FIXED_AIOKAFKA_VERSION = "0.14.0"
_aiokafka_wait_on_metadata = AIOKafkaClient._wait_on_metadata  # unpatched, at import


async def _wait_on_metadata_tracking(self, topic: str):
    # Added without forcing a refresh: the cluster metadata already has it, and the next
    # refresh (periodic or forced) asks for it along with the others.
    self._topics.add(topic)
    return await _aiokafka_wait_on_metadata(self, topic)


# -- fix 5: no gaps on topics whose offsets are contiguous ---------------------------

_gapless_topics: set[str] = set()
_faust_add_gap = Consumer._add_gap  # unpatched, at import


def refuse_gaps_on(*topics: str) -> None:
    """Plain (not compacted, not transactional) topics: offsets never skip there."""
    _gapless_topics.update(topics)


async def _add_gap_unless_gapless(self, tp, offset_from: int, offset_to: int) -> None:
    # Faust calls this with (last read + 1, offset of the record that arrived), just
    # before it hands that record to the agents.
    if tp.topic in _gapless_topics:
        earliest = (await self.earliest_offsets(tp)).get(tp)
        if earliest is not None and earliest >= offset_to:
            # Retention deleted the skipped records (a worker down that long): nothing
            # is there to read, so Faust's gap is right.
            log.warning(
                "%s:%s: offsets %d..%d were deleted by retention before this worker read "
                "them", tp.topic, tp.partition, offset_from, offset_to - 1,
            )  # fmt: skip
            await _faust_add_gap(self, tp, offset_from, offset_to)
            return
        log.critical(
            "%s:%s: record %d arrived after %d, offsets %d..%d were skipped; restarting in "
            "place before processing it, so the skipped records are read first",
            tp.topic, tp.partition, offset_to, offset_from - 1, offset_from, offset_to - 1,
        )  # fmt: skip
        restart_in_place()
        return
    await _faust_add_gap(self, tp, offset_from, offset_to)


def _new_offset_from_committed(self, tp) -> int | None:
    """The offset to commit for ``tp``: one past the run of acked offsets that starts at
    the committed offset (Faust's gaps count as acked); None when that offset itself is
    not acked yet. Replaces Consumer._new_offset (faust-streaming 0.15.3)."""
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
    run = acked[:end]
    del acked[:end]
    self._acked_index[tp].difference_update(run)
    return run[-1] + 1


async def put_durably(
    table: faust.Table, key: bytes, value: bytes | None, partition: int | None = None
) -> None:
    """table[key] = value (None: delete the key), returning once its changelog write is
    acknowledged (fix 2).

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


def exit_on_error(agent: Callable[[faust.StreamT], Awaitable[None]]):
    """Fix 3: Faust acks a take_events() batch even when the agent body raised, and then
    restarts the agent, so the batch would be lost. An agent wrapped in this ends the
    worker instead, before the acks can be committed; its batch is read again on restart."""

    @functools.wraps(agent)
    async def guarded(stream: faust.StreamT) -> None:
        try:
            await agent(stream)
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


# -- fix 4: a watchdog for a fetcher that stops delivering ---------------------------
#
# Seen in about one restart in ten before the uncommitted partitions were seeked to
# the beginning (fix 1): a "ready" worker with every partition active and the
# high-water marks moving that read nothing. Also seen (about one full test run in
# three): the aiokafka producer stops draining, so sends and Faust's commits (which
# flush the producer first) wait forever while the fetcher goes on reading. Kept as a
# safety net: a worker with work outstanding on a partition (unread or uncommitted)
# whose read and committed offsets have not moved for `stall_after_s` restarts itself
# in place (same pid, same command); what it had not committed is read again.


@dataclass
class StallWatch:
    stall_after_s: float
    since: dict[Any, tuple[tuple[int | None, int | None], float]] = field(default_factory=dict)

    def stalled(self, progress: dict[Any, tuple[int | None, ...]], now: float) -> list:
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


def restart_in_place() -> None:
    """Replace this process with a fresh `vtp <same arguments>` (the pid stays)."""
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, "-m", "vtp.cli", *sys.argv[1:]])

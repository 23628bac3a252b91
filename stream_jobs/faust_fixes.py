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

The first fix replaces a method body, so it is tied to the pinned Faust version.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import faust
from faust.tables.recovery import Recovery

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


async def put_durably(
    table: faust.Table, key: bytes, value: bytes, partition: int | None = None
) -> None:
    """table[key] = value, returning once its changelog write is acknowledged (fix 2).

    ``partition``: the changelog partition, i.e. the source partition the key's
    messages arrive on; None lets the producer's partitioner choose, for which Faust
    needs the changelog topic's metadata at hand (it does not wait for it)."""
    if partition is None:
        producer = cast(Any, table.app.producer)._ensure_producer()
        await producer.partitions_for(table.changelog_topic.get_topic_name())
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
# high-water marks moving that read nothing. Kept as a safety net: a worker that is
# behind on a partition and has not read from it for `stall_after_s` restarts itself in
# place (same pid, same command); what it had not committed is read again.


@dataclass
class StallWatch:
    stall_after_s: float
    since: dict[Any, tuple[int | None, float]] = field(default_factory=dict)

    def stalled(self, progress: dict[Any, tuple[int | None, int | None]], now: float) -> list:
        """Partitions behind their high-water mark whose read offset has not moved for
        ``stall_after_s``. ``progress``: partition -> (last offset read, high-water)."""
        stuck = []
        for tp, (read, high) in progress.items():
            behind = high is not None and high > (read if read is not None else -1) + 1
            seen = self.since.get(tp)
            if not behind or seen is None or seen[0] != read:
                self.since[tp] = (read, now)
            elif now - seen[1] >= self.stall_after_s:
                stuck.append(tp)
        for tp in set(self.since) - set(progress):
            del self.since[tp]
        return stuck


def restart_in_place() -> None:
    """Replace this process with a fresh `vtp <same arguments>` (the pid stays)."""
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, "-m", "vtp.cli", *sys.argv[1:]])

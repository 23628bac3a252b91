"""Each fix to faust-streaming and aiokafka (docs/adr/0001-faust-fixes.md): what the
unpatched library does wrong, and what the fix does instead."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiokafka
import faust
import pytest
from aiokafka.client import AIOKafkaClient
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP
from intervaltree import IntervalTree

from stream_jobs import faust_fixes
from stream_jobs.faust_fixes import _recovery_completed_seeking_first


@pytest.fixture(autouse=True)
def unpatched_after_each_test(monkeypatch):
    """install() patches library classes: each test gives them back as they were."""
    for owner, name in [
        (Recovery, "on_recovery_completed"),
        (Consumer, "_add_gap"),
        (Consumer, "_wait_next_records"),
        (Consumer, "_new_offset"),
        (AIOKafkaClient, "_wait_on_metadata"),
    ]:
        monkeypatch.setattr(owner, name, getattr(owner, name))


class _Table:
    def __init__(self, calls: list[str]):
        self.calls = calls

    async def on_recovery_completed(self, actives: set, standbys: set) -> None:
        self.calls.append("table")


class _Signal:
    async def send(self) -> None:
        pass


def _recovery_double(calls: list[str], committed: int | None = 5) -> SimpleNamespace:
    """Just enough of a Recovery for on_recovery_completed, recording what it does in order."""
    consumer = SimpleNamespace(
        _committed_offset={("uploads", 0): committed},
        seek=lambda tp, offset: _record(calls, f"seek {tp} to {offset}"),
        assignment=lambda: {("uploads", 0), ("vtp-validate-seen-changelog", 0)},
        perform_seek=lambda: _record(calls, "seek"),
        resume_partitions=lambda tps: calls.append(f"resume {sorted(tps)}"),
        resume_flow=lambda: calls.append("resume_flow"),
    )
    fetcher = SimpleNamespace(maybe_start=lambda: _record(calls, "fetcher"))
    app = SimpleNamespace(
        consumer=consumer,
        consumer_generation_id=7,
        on_rebalance_complete=_Signal(),
        conf=SimpleNamespace(broker_request_timeout=1.0),
        flow_control=SimpleNamespace(resume=lambda: calls.append("flow_control")),
        _fetcher=fetcher,
        on_rebalance_end=lambda: calls.append("rebalance_end"),
        assignor=SimpleNamespace(assigned_standbys=lambda: set()),
    )
    table = _Table(calls)

    async def wait(coro, timeout=None):
        await coro

    return SimpleNamespace(
        app=app,
        log=SimpleNamespace(info=lambda *a: None, warning=lambda *a: None, dev=lambda *a: None),
        _wait=wait,
        _is_changelog_tp=lambda tp: tp[0].endswith("-changelog"),
        completed=asyncio.Event(),
        tables=SimpleNamespace(
            on_actives_ready=lambda: None, on_standbys_ready=lambda: None, values=lambda: [table]
        ),
        _set_recovery_ended=lambda: calls.append("recovery_ended"),
        actives_for_table={table: set()},
        standbys_for_table={table: set()},
    )


async def _record(calls: list[str], what: str) -> None:
    calls.append(what)


def test_after_a_restore_streams_are_seeked_before_they_resume():
    calls: list[str] = []
    recovery = _recovery_double(calls)
    asyncio.run(_recovery_completed_seeking_first(recovery, generation_id=7))
    assert calls == [
        "recovery_ended",
        "table",
        "seek",
        "resume [('uploads', 0)]",
        "flow_control",
        "resume_flow",
        "fetcher",
        "rebalance_end",
    ]


def test_unpatched_faust_resumes_streams_before_it_seeks_them():
    calls: list[str] = []
    asyncio.run(faust_fixes._faust_on_recovery_completed(_recovery_double(calls), 7))
    assert calls.index("resume [('uploads', 0)]") < calls.index("seek")  # records in between


def test_a_partition_the_group_never_committed_starts_at_the_beginning():
    calls: list[str] = []
    asyncio.run(_recovery_completed_seeking_first(_recovery_double(calls, None), 7))
    assert calls[2:5] == ["seek", "seek ('uploads', 0) to 0", "resume [('uploads', 0)]"]


def test_a_newer_rebalance_leaves_the_streams_alone():
    calls: list[str] = []
    recovery = _recovery_double(calls)
    asyncio.run(_recovery_completed_seeking_first(recovery, generation_id=6))
    assert calls == ["recovery_ended", "table"]


def test_install_replaces_the_method_and_refuses_other_faust_versions(monkeypatch):
    faust_fixes.install()
    assert Recovery.on_recovery_completed is _recovery_completed_seeking_first
    monkeypatch.setattr(faust, "__version__", "0.16.0")
    with pytest.raises(RuntimeError, match=r"patches faust-streaming 0\.15\.3, found 0\.16\.0"):
        faust_fixes.install()


def test_an_agent_that_raises_ends_the_worker_instead_of_losing_its_batch(monkeypatch):
    exits: list[int] = []
    monkeypatch.setattr(faust_fixes, "_exit", exits.append)

    @faust_fixes.exit_on_error
    async def failing(stream) -> None:
        raise TypeError("a bug in the batch body")

    @faust_fixes.exit_on_error
    async def cancelled(stream) -> None:
        raise asyncio.CancelledError

    asyncio.run(failing(None))
    assert exits == [faust_fixes.EXIT_AGENT_FAILED] and failing.__name__ == "failing"
    with pytest.raises(asyncio.CancelledError):  # a worker shutting down is not a failure
        asyncio.run(cancelled(None))
    assert exits == [faust_fixes.EXIT_AGENT_FAILED]


def test_the_watchdog_names_partitions_behind_that_stopped_reading():
    watch = faust_fixes.StallWatch(stall_after_s=60)
    caught_up = (499, 500, 500, 0)
    assert watch.stalled({"a": (99, 50, 500, 0), "b": caught_up, "c": (None, None, 0, 0)}, 0) == []
    assert watch.stalled({"a": (99, 50, 500, 0), "b": caught_up}, now=59) == []
    # a: behind and not moving for 60 s; b: read and committed all; c: no longer assigned
    assert watch.stalled({"a": (99, 50, 500, 0), "b": caught_up}, now=60) == ["a"]
    assert "c" not in watch.since
    assert watch.stalled({"a": (150, 50, 600, 0)}, now=61) == []  # read again: clock restarts
    assert watch.stalled({"a": (150, 50, 600, 0)}, now=120) == []
    assert watch.stalled({"a": (150, 50, 600, 0)}, now=121) == ["a"]
    assert watch.stalled({"a": (None, None, 10, 0)}, now=200) == []  # never read, behind
    assert watch.stalled({"a": (None, None, 10, 0)}, now=260) == ["a"]
    # seeked to 2655 (read offset = next to read = committed) and nothing arrives
    assert watch.stalled({"a": (2655, 2655, 5110, 0)}, now=300) == []
    assert watch.stalled({"a": (2655, 2655, 5110, 0)}, now=360) == ["a"]


def test_the_watchdog_names_partitions_read_to_the_end_whose_commits_stopped():
    watch = faust_fixes.StallWatch(stall_after_s=60)
    # everything read; the producer stopped draining, so acks pile up uncommitted
    stuck = {"a": (499, None, 500, 88), "b": (499, 300, 500, 0)}
    assert watch.stalled(stuck, now=0) == []
    assert watch.stalled(stuck, now=60) == ["a", "b"]
    # a commit moves the clock; a partition committed to its end is never stalled
    assert watch.stalled({"b": (499, 400, 500, 0), "c": (9, 10, 10, 0)}, now=70) == []
    assert watch.stalled({"b": (499, 400, 500, 0), "c": (9, 10, 10, 0)}, now=200) == ["b"]


def test_the_watchdog_leaves_a_worker_alone_that_was_seeked_to_its_end():
    # after a restart Faust's read offset is the seek position, equal to the committed one
    watch = faust_fixes.StallWatch(stall_after_s=60)
    seeked = {"a": (3064, 3064, 3064, 0), "b": (2, 2, 2, 0), "c": (None, None, 0, 0)}
    assert watch.stalled(seeked, now=0) == []
    assert watch.stalled(seeked, now=1000) == []


UPLOADS = TP("uploads", 0)


class _Bookkeeping:
    """The parts of a Faust Consumer that its commit bookkeeping reads."""

    def __init__(self, acked: list[int], committed: int | None):
        self._acked = {UPLOADS: list(acked)}
        self._acked_index = {UPLOADS: set(acked)}
        self._gap = {UPLOADS: IntervalTree()}
        self._committed_offset = {UPLOADS: committed}


class _Consumer:
    log_start = 0

    def __init__(self):
        self._gap = {TP("plain", 0): IntervalTree()}
        self._committed_offset = {TP("plain", 0): None}

    async def earliest_offsets(self, tp):
        return {tp: self.log_start}


def test_unpatched_faust_commits_past_offsets_it_never_processed():
    new_offset = faust_fixes._faust_new_offset
    assert new_offset(_Bookkeeping([32], committed=31), UPLOADS) == 33  # 31 was never processed
    assert new_offset(_Bookkeeping([40, 41, 42, 43, 44], committed=0), UPLOADS) == 45
    consumer = _Consumer()  # and a skip on a plain topic is a gap, i.e. processed
    asyncio.run(faust_fixes._faust_add_gap(consumer, TP("plain", 0), 248, 808))
    assert consumer._gap[TP("plain", 0)].overlaps(248, 809)


def test_a_commit_never_passes_an_offset_that_was_not_processed():
    new_offset = faust_fixes._new_offset_from_committed
    # committed 31 = 31 is the next to process; Faust committed 33 here (off by one)
    assert new_offset(_Bookkeeping([32], committed=31), UPLOADS) is None
    # committed 0: Faust skipped the check altogether and committed 45
    assert new_offset(_Bookkeeping([40, 41, 42, 43, 44], committed=0), UPLOADS) is None
    book = _Bookkeeping([31, 32, 33, 35], committed=31)
    assert new_offset(book, UPLOADS) == 34
    assert book._acked[UPLOADS] == [35] and book._acked_index[UPLOADS] == {35}
    # offsets acked again after a seek back are dropped, not counted
    book = _Bookkeeping([10, 11, 12, 13], committed=12)
    assert new_offset(book, UPLOADS) == 14
    assert book._acked[UPLOADS] == []
    # nothing committed yet: the first run read counts, as in Faust
    assert new_offset(_Bookkeeping([0, 1, 2, 5], committed=None), UPLOADS) == 3


def test_gaps_fill_the_run_on_compacted_topics_only_a_skip_elsewhere_restarts(monkeypatch):
    book = _Bookkeeping([3, 4, 8], committed=3)
    book._gap[UPLOADS].addi(5, 8)  # 5..7 compacted away
    assert faust_fixes._new_offset_from_committed(book, UPLOADS) == 9

    restarts = []
    monkeypatch.setattr(faust_fixes, "exit_for_restart", lambda: restarts.append(1))
    faust_fixes.install()
    faust_fixes.refuse_gaps_on("plain")
    consumer = _Consumer()
    asyncio.run(faust_fixes._add_gap_unless_gapless(consumer, TP("plain", 0), 248, 808))
    assert not consumer._gap[TP("plain", 0)]  # never counted as processed
    assert restarts == [1]  # and the worker restarts before record 808 is processed
    # records deleted by retention while the worker was down are a gap, as in Faust
    consumer.log_start = 808
    asyncio.run(faust_fixes._add_gap_unless_gapless(consumer, TP("plain", 0), 248, 808))
    assert consumer._gap[TP("plain", 0)].overlaps(248, 809) and restarts == [1]


def test_a_commit_stops_below_the_topics_limit_and_moves_on_when_it_rises(monkeypatch):
    limits = {0: 0}
    monkeypatch.setattr(faust_fixes, "_commit_limits", {})
    faust_fixes.commit_below("uploads", limits.__getitem__)
    new_offset = faust_fixes._new_offset_from_committed
    book = _Bookkeeping([31, 32, 33, 34], committed=31)
    assert new_offset(book, UPLOADS) is None  # no checkpoint covers any of them yet
    assert book._acked[UPLOADS] == [31, 32, 33, 34]  # kept for when one does
    limits[0] = 33
    assert new_offset(book, UPLOADS) == 33
    assert book._acked[UPLOADS] == [33, 34] and book._acked_index[UPLOADS] == {33, 34}
    book._committed_offset[UPLOADS] = 33
    limits[0] = 100  # past what was processed: the run still ends where processing did
    assert new_offset(book, UPLOADS) == 35
    other = TP("registry", 0)  # other topics commit as before
    book._acked[other], book._acked_index[other] = [5, 6], {5, 6}
    book._gap[other], book._committed_offset[other] = IntervalTree(), 5
    assert new_offset(book, other) == 7


def test_the_producer_keeps_refreshing_every_topic_it_sends_to():
    faust_fixes.install()

    async def send_to_a_known_topic() -> set[str]:
        client = AIOKafkaClient(bootstrap_servers="127.0.0.1:9")  # never started
        client.cluster.partitions_for_topic = lambda topic: {0, 1}  # metadata has it
        assert await client._wait_on_metadata("validated.cn") == {0, 1}
        return client._topics

    assert asyncio.run(send_to_a_known_topic()) == {"validated.cn"}


def test_unpatched_aiokafka_forgets_a_topic_the_metadata_already_knows():
    async def send_to_a_known_topic() -> set[str]:
        client = AIOKafkaClient(bootstrap_servers="127.0.0.1:9")  # never started
        client.cluster.partitions_for_topic = lambda topic: {0, 1}
        assert await faust_fixes._aiokafka_wait_on_metadata(client, "validated.cn") == {0, 1}
        return client._topics

    # left out: the next refresh of other topics drops it, and its batches wait forever
    assert asyncio.run(send_to_a_known_topic()) == set()


def test_install_patches_nothing_when_aiokafka_is_another_version(monkeypatch):
    monkeypatch.setattr(aiokafka, "__version__", "0.15.0")
    with pytest.raises(RuntimeError, match=r"patches aiokafka 0\.14\.0, found 0\.15\.0"):
        faust_fixes.install()
    assert Recovery.on_recovery_completed is faust_fixes._faust_on_recovery_completed
    assert Consumer._new_offset is faust_fixes._faust_new_offset


def test_unpatched_faust_acks_the_batch_of_an_agent_that_raised():
    # Faust's own test harness for an agent: no broker is contacted.
    app = faust.App("vtp-test-ack", broker="kafka://127.0.0.1:9", store="memory://")
    topic = app.topic("in", value_type=bytes, value_serializer="raw")
    taken: list = []

    @app.agent(topic)
    async def failing(stream) -> None:
        async for events in stream.take_events(10, within=0.1):
            taken.extend(e.message for e in events)
            raise TypeError("a bug in the batch body")

    async def put_one() -> None:
        async with failing.test_context() as agent:
            await agent.put(b"upload")
            await asyncio.sleep(0.3)

    loop = asyncio.new_event_loop()
    app.loop = loop  # Faust's objects bind to the app's loop: one the test closes
    try:
        loop.run_until_complete(put_one())
    finally:
        loop.close()
        # and the loop of the consumer thread Faust made for it, never started here
        faust_fixes.internals(app.consumer)._thread.thread_loop.close()
    assert len(taken) == 1 and taken[0].acked  # processed by nobody, yet acked: lost


def _worker_consumer_fetch_wait(create) -> int:
    async def made() -> int:
        app = faust.App("vtp-test-fetch", broker="kafka://127.0.0.1:9", store="memory://")
        thread = app.consumer._thread  # never started: its own loop is closed here
        consumer = create(thread, app.transport)  # constructed, never started
        try:
            return consumer._fetch_max_wait_ms
        finally:
            await consumer.stop()
            thread.thread_loop.close()

    return asyncio.run(made())


def test_the_worker_consumer_waits_at_most_100_ms_for_a_fetch():
    faust_fixes.install()
    assert _worker_consumer_fetch_wait(AIOKafkaConsumerThread._create_worker_consumer) == 100


def test_unpatched_faust_lets_a_fetch_of_idle_partitions_hold_the_uploads_1500_ms():
    assert _worker_consumer_fetch_wait(faust_fixes._faust_create_worker_consumer) == 1500


STREAM, CHANGES = TP("vtp.cn.uploads", 0), TP("vtp-cn-worker-seen-changelog", 0)


def _fetch_while_recovery_finishes(wait_next_records) -> tuple[dict, set]:
    """A real Faust consumer (never started) fetching while the recovery finishes: its
    changelog partition active, the uploads paused; during the fetch the recovery pauses
    the changelog ("Done reading from changelog topics"). Records wait in aiokafka for
    both. Returns what the consumer thread handed over and what Faust keeps of it."""

    async def fetch() -> tuple[dict, set]:
        app = faust.App("vtp-test-copy", broker="kafka://127.0.0.1:9", store="memory://")
        consumer = app.consumer
        consumer._set_active_tps({STREAM, CHANGES})
        consumer.pause_partitions({STREAM})

        async def thread_getmany(active_partitions, timeout):
            consumer.pause_partitions({CHANGES})  # meanwhile, on the app's loop
            waiting = {STREAM: ["upload 3"], CHANGES: ["change 9"]}
            # aiokafka's Fetcher.fetched_records: an empty set skips no partition
            return {
                tp: r
                for tp, r in waiting.items()
                if not active_partitions or tp in active_partitions
            }

        consumer._getmany = thread_getmany
        try:
            records, active = await wait_next_records(consumer, 1.0)
        finally:
            consumer._thread.thread_loop.close()  # never started
        kept = {tp for tp in records if tp in active}  # Consumer.getmany's filter
        return records, kept

    return asyncio.run(fetch())


def test_unpatched_faust_lets_a_fetch_take_the_paused_uploads_and_drops_them():
    handed_over, kept = _fetch_while_recovery_finishes(faust_fixes._faust_wait_next_records)
    assert STREAM in handed_over and kept == set()  # aiokafka moved past "upload 3"


def test_a_fetch_takes_only_what_was_active_when_it_began():
    handed_over, kept = _fetch_while_recovery_finishes(faust_fixes._wait_next_records_on_a_copy)
    assert handed_over == {CHANGES: ["change 9"]} and kept == set()  # uploads stay in aiokafka


def test_install_fetches_on_a_copy():
    faust_fixes.install()
    assert Consumer._wait_next_records is faust_fixes._wait_next_records_on_a_copy

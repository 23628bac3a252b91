"""The worker's checkpoints: acks wait for the write that covers them."""

from __future__ import annotations

import asyncio

import pytest

from stream_jobs.checkpoint import Checkpoints
from vtp.core.settings import SettingsError, load_settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_offsets_become_committable_only_once_a_write_covers_them():
    async def scenario() -> None:
        clock, writes = Clock(), []
        checkpoints: Checkpoints

        async def write() -> None:
            writes.append(checkpoints.limit(0))

        checkpoints = Checkpoints(5.0, write, clock)
        assert not checkpoints.due() and checkpoints.limit(0) == 0
        checkpoints.processed({0: 41, 2: 7})
        clock.now += 0.9
        checkpoints.processed({0: 40})  # never backwards
        clock.now += 0.9
        assert not checkpoints.due()  # the interval is not over, batches keep coming
        clock.now += 3.2
        checkpoints.processed({})
        assert checkpoints.due()  # the interval is over
        await checkpoints.run()
        assert writes == [0]  # while writing, nothing new is committable
        assert (checkpoints.limit(0), checkpoints.limit(2), checkpoints.limit(1)) == (42, 8, 0)
        clock.now += 60.0
        assert not checkpoints.due()  # nothing processed since

    asyncio.run(scenario())


def test_a_stream_that_went_quiet_is_checkpointed_without_waiting_for_the_interval():
    clock = Clock()

    async def write() -> None:
        pass

    checkpoints = Checkpoints(60.0, write, clock)
    checkpoints.processed({0: 9})
    clock.now += 11.0
    assert not checkpoints.due()
    clock.now += 1.0  # a fifth of the interval without a batch
    assert checkpoints.due()


def test_a_batch_done_while_a_write_runs_waits_for_the_next_one():
    async def scenario() -> None:
        gate = asyncio.Event()

        async def write() -> None:
            await gate.wait()

        checkpoints = Checkpoints(0.0, write)
        checkpoints.processed({0: 9})
        running = asyncio.create_task(checkpoints.run())
        await asyncio.sleep(0)
        checkpoints.processed({0: 19})  # its states may have changed after the write began
        gate.set()
        await running
        assert checkpoints.limit(0) == 10 and checkpoints.due()

    asyncio.run(scenario())


def test_a_failed_write_makes_nothing_committable():
    async def scenario() -> None:
        async def write() -> None:
            raise RuntimeError("broker gone")

        checkpoints = Checkpoints(0.0, write)
        checkpoints.processed({0: 9})
        with pytest.raises(RuntimeError):
            await checkpoints.run()
        assert checkpoints.limit(0) == 0

    asyncio.run(scenario())


def test_moved_partitions_start_from_what_kafka_has():
    async def scenario() -> None:
        async def write() -> None:
            pass

        checkpoints = Checkpoints(0.0, write)
        checkpoints.processed({0: 9})
        await checkpoints.run()
        checkpoints.forget()
        assert checkpoints.limit(0) == 0 and not checkpoints.due()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VTP_STATE_CHECKPOINT_S": "-1"}, "VTP_STATE_CHECKPOINT_S must be 0 or more"),
        (
            {"VTP_STATE_CHECKPOINT_S": "30", "VTP_WORKER_STALL_S": "60"},
            "VTP_WORKER_STALL_S must be 0 or more than twice VTP_STATE_CHECKPOINT_S",
        ),
    ],
)
def test_a_checkpoint_interval_the_stall_watch_cannot_live_with_is_refused(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


def test_the_stall_watch_off_allows_any_interval():
    assert load_settings({"VTP_STATE_CHECKPOINT_S": "300", "VTP_WORKER_STALL_S": "0"})


def test_a_write_that_partitions_moved_under_covers_nothing():
    async def scenario() -> None:
        checkpoints: Checkpoints

        async def write() -> None:
            checkpoints.forget()  # a rebalance while the write was under way

        checkpoints = Checkpoints(0.0, write)
        checkpoints.processed({3: 999})
        await checkpoints.run()
        assert checkpoints.limit(3) == 0 and not checkpoints.due()

    asyncio.run(scenario())

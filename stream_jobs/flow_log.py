"""What a worker is doing, for a human: `kill -USR1 <worker pid>` and the stall watchdog
log it. Reads Faust's and aiokafka's internals (both pinned, see faust_fixes)."""

from __future__ import annotations

import asyncio
import logging
import time

import faust

from stream_jobs.faust_fixes import internals

log = logging.getLogger("vtp.worker")


def log_flow_state(app: faust.App) -> None:
    """What the consumer and the agents are doing; `kill -USR1 <worker pid>` logs it."""
    consumer = internals(app.consumer)
    log.warning(
        "flow: active=%s paused=%d buffered=%s flow_active=%s fetcher=%s",
        sorted(f"{tp.topic}:{tp.partition}" for tp in consumer._active_partitions or ()),
        len(consumer._paused_partitions),
        sorted(map(str, consumer._buffered_partitions)),
        consumer.flow_active,
        app._fetcher.state,
    )
    for tp in sorted(consumer.assignment()):
        acked = sorted(consumer._acked[tp])
        log.warning(
            "flow: %s:%s committed=%s read=%s acked=%s..(%d) high=%s",
            tp.topic,
            tp.partition,
            consumer._committed_offset[tp],
            consumer._read_offset[tp],
            acked[:3],
            len(acked),
            consumer.highwater(tp),
        )
    log_fetch_state(app)
    log_producer_state(app)
    log.warning("flow: agents\n%s", app.agents.human_tracebacks())


def log_fetch_state(app: faust.App) -> None:
    """What aiokafka's own consumer (in Faust's consumer thread) holds per partition:
    paused or not, and where it will fetch next."""
    aio = internals(app.consumer)._thread._consumer
    assignment = aio._subscription.subscription and aio._subscription.subscription.assignment
    if not assignment:
        return
    for tp in sorted(assignment.tps):
        state = assignment.state_value(tp)
        log.warning(
            "fetch: %s:%s paused=%s position=%s awaiting_reset=%s",
            tp.topic,
            tp.partition,
            state.paused,
            state.position if state.has_valid_position else None,
            state.awaiting_reset,
        )


def log_producer_state(app: faust.App) -> None:
    """The aiokafka producer's sender: requests in flight per broker connection, and
    batches waiting per partition (a send that never drains blocks commits too)."""
    producer = getattr(app.producer, "_producer", None)
    if producer is None:
        return
    sender = producer._sender
    now = time.monotonic()
    cluster = producer.client.cluster
    waiting = {
        f"{tp.topic}:{tp.partition}": (
            len(q),
            cluster.leader_for_partition(tp),
            tp.topic in producer.client._topics,
            round(now - q[0]._ctime, 1),
        )
        for tp, q in producer._message_accumulator._batches.items()
        if q
    }
    log.warning(
        "producer: in_flight=%s muted=%s waiting (batches, leader, topic in metadata, "
        "age s)=%s sender_task=%s",
        sorted(sender._in_flight),
        sorted(map(str, sender._muted_partitions)),
        waiting,
        sender.sender_task,
    )
    for key, conn in producer.client._conns.items():
        pending = [(cid, type(req).__name__) for cid, req, _ in conn._requests]
        log.warning(
            "producer: connection %s idle %.1f s, pending %s",
            key,
            now - conn._last_action,
            pending,
        )
    for task in asyncio.all_tasks():
        if "_send_produce_req" in getattr(task.get_coro(), "__qualname__", ""):
            log.warning("producer: request in flight awaiting %s", _awaiting(task.get_coro()))


def _awaiting(coro) -> list[str]:
    """Where a suspended coroutine waits: its chain of awaited coroutines."""
    chain = []
    while coro is not None and hasattr(coro, "cr_frame"):
        if coro.cr_frame is not None:
            chain.append(f"{coro.cr_code.co_name}:{coro.cr_frame.f_lineno}")
        coro = coro.cr_await
    if coro is not None:
        chain.append(repr(coro)[:200])
    return chain

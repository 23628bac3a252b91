"""Run a region's processes as users do, and observe it from outside: is it drained,
and where did every raw message end up? Functions that take several regions' settings
look at each region's own cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from vtp.core import headers as h
from vtp.core.kafka import retry_kafka
from vtp.core.settings import Settings, as_environment


def settings_env(settings: Settings, metrics_port: int = 0) -> dict[str, str]:
    """The environment that gives a child process the same settings (every one of them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTP_")}
    env.update(as_environment(settings.with_(kafka_bootstrap=settings.bootstrap())))
    env["VTP_METRICS_PORT"] = str(metrics_port)
    return env


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM by our own pid, then SIGKILL if it does not end in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_process(
    settings: Settings, name: str, *args: str, metrics_port: int = 0, module: str = "vtp.cli"
) -> Process:
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child from here on
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=settings_env(settings, metrics_port),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log_file.close()
    return Process(name, popen, log_path)


def start_worker(settings: Settings, metrics_port: int = 0) -> Process:
    return start_process(
        settings, f"worker-{settings.need_region()}", "worker", metrics_port=metrics_port
    )


def start_sink(settings: Settings, metrics_port: int = 0) -> Process:
    return start_process(
        settings, f"sink-{settings.need_region()}", "sink", metrics_port=metrics_port
    )


def start_serve(settings: Settings, metrics_port: int = 0) -> Process:
    """`vtp serve`: the region's sink and its owner API in one process."""
    return start_process(
        settings, f"serve-{settings.need_region()}", "serve", metrics_port=metrics_port
    )


def start_region(settings: Settings) -> tuple[list[Process], str]:
    """A region's stack as operators run it, on its broker: topics, `vtp worker` and
    `vtp serve` (sink + owner API). Returns the processes and the API's URL."""
    from vtp.core.topics import create_topics
    from vtp.serve import wait_for_service

    create_topics(settings)
    worker, serve = start_worker(settings), start_serve(settings)
    try:
        return [worker, serve], wait_for_service(settings, serve)
    except BaseException:
        for p in (worker, serve):
            p.stop()
        raise


def group_position(settings: Settings, group: str, topics: list[str]) -> tuple[int, int]:
    """(messages committed by ``group``, messages in ``topics``), summed over partitions."""
    consumer = Consumer(
        {"bootstrap.servers": settings.bootstrap(), "group.id": group, **settings.kafka_extra}
    )
    committed_total, high_total = 0, 0
    try:
        for topic in topics:
            meta = retry_kafka(lambda t=topic: consumer.list_topics(t, timeout=10), "metadata")
            found = meta.topics.get(topic)
            if found is None:
                continue
            tps = [TopicPartition(topic, p) for p in found.partitions]
            committed = retry_kafka(lambda t=tps: consumer.committed(t, timeout=10), "committed")
            for tp in committed:
                low, high = retry_kafka(
                    lambda tp=tp: consumer.get_watermark_offsets(tp, timeout=10), "watermarks"
                )
                committed_total += (tp.offset if tp.offset >= 0 else low) - low
                high_total += high - low
    finally:
        consumer.close()
    return committed_total, high_total


def pipeline_groups(settings: Settings) -> dict[str, list[str]]:
    t = settings.topics
    return {
        t.worker_app: [t.vehicles, t.uploads, t.validated],
        t.sink_group: [t.validated, t.aggregates],
    }


def _regions(stacks: Settings | list[Settings]) -> list[Settings]:
    return [stacks] if isinstance(stacks, Settings) else list(stacks)


def pipeline_positions(stacks: Settings | list[Settings]) -> dict[str, tuple[int, int]]:
    """'group topic' -> (committed, total): where each consumer of the pipeline stands."""
    return {
        f"{group} {topic}": group_position(settings, group, [topic])
        for settings in _regions(stacks)
        for group, topics in pipeline_groups(settings).items()
        for topic in topics
    }


def pipeline_lag(stacks: Settings | list[Settings]) -> int:
    """Messages not yet committed by the workers (uploads, validated: they validate and
    aggregate) and the sinks (validated, aggregates)."""
    total = 0
    for settings in _regions(stacks):
        for group, topics in pipeline_groups(settings).items():
            committed, high = group_position(settings, group, topics)
            total += high - committed
    return total


class NotDrained(RuntimeError):
    """The pipeline still had messages to process when the wait ended; the message says
    where each consumer group stands and what each process last logged."""


def wait_drained(
    settings: Settings | list[Settings],
    processes: list[Process],
    timeout: float = 180.0,
    progress=None,
) -> bool:
    """True once every consumer of the pipeline has committed everything; raises
    NotDrained (with the evidence) after ``timeout`` seconds, or when a process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in processes:
            if p.popen.poll() is not None:
                raise NotDrained(f"{p.name} exited with {p.popen.returncode}:\n{p.log_tail()}")
        lag = pipeline_lag(settings)
        if progress:
            progress(lag)
        if lag == 0:
            return True
        time.sleep(1.0)
    raise NotDrained(_not_drained_report(settings, processes, timeout))


def _not_drained_report(
    settings: Settings | list[Settings], processes: list[Process], timeout: float
) -> str:
    lines = [f"not drained after {timeout:g} s; committed/total per consumer:"]
    for name, (committed, total) in pipeline_positions(settings).items():
        lines.append(f"  {name}: {committed}/{total}")
    for p in processes:
        lines.append(f"--- last lines of {p.log_path} ---\n{p.log_tail(60)}")
    return "\n".join(lines)


@dataclass
class Outcomes:
    """Distinct raw messages per destination and reason (dead letters may repeat on replay).

    ``too_late`` counts uploads whose samples aggregation refused (stage aggregate): the
    samples are stored all the same, so they are not an outcome of the raw message.
    ``partial`` counts, per reason, samples quarantined from messages whose other samples
    were stored (their outcome is "stored")."""

    deadlettered: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)
    too_late: int = 0
    partial: Counter = field(default_factory=Counter)

    @property
    def deadlettered_total(self) -> int:
        return sum(self.deadlettered.values())

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


def _read_to_end(settings: Settings, topic: str) -> dict[tuple[str, str], tuple[str, int | None]]:
    """(vtp-stage, vtp-source) -> (vtp-reason, vtp-partial) of every message in ``topic``."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap(),
            "group.id": f"vtp-observer-{os.getpid()}-{time.monotonic_ns()}",
            "enable.auto.commit": False,
        }
    )
    found: dict[tuple[str, str], tuple[str, int | None]] = {}
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None:
            return found
        ends = {}
        assignment = []
        for p in meta.partitions:
            low, high = retry_kafka(
                lambda p=p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10),
                "watermarks",
            )
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        deadline = time.monotonic() + 60
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=1.0):
                if m.error():
                    continue
                headers = {k: (v or b"").decode() for k, v in (m.headers() or [])}
                source = headers.get(h.SOURCE, f"{topic}:{m.partition()}:{m.offset()}")
                partial = headers.get(h.PARTIAL)
                found[(headers.get(h.STAGE, ""), source)] = (
                    headers.get(h.REASON, "unknown"),
                    int(partial) if partial else None,
                )
                if m.offset() + 1 >= ends.get(m.partition(), 0):
                    ends.pop(m.partition(), None)
        return found
    finally:
        consumer.close()


def read_outcomes(settings: Settings) -> Outcomes:
    """What the region's dead-letter and quarantine topics hold, per raw message."""
    dead = _read_to_end(settings, settings.topics.deadletter)
    # One raw message, one outcome: a replay after a crash may dead-letter the same
    # message again, even at another stage (refused by the worker, then by the sink).
    refused = {source: r for (stage, source), (r, _) in dead.items() if stage != "aggregate"}
    quarantine = _read_to_end(settings, settings.topics.quarantine)
    whole = {source: r for (_, source), (r, partial) in quarantine.items() if partial is None}
    partial: Counter = Counter()
    for (_, source), (reason, samples) in quarantine.items():
        if samples is not None and source not in whole:
            partial[reason] += samples
    return Outcomes(
        deadlettered=Counter(refused.values()),
        quarantined=Counter(whole.values()),
        too_late=sum(1 for stage, _ in dead if stage == "aggregate"),
        partial=partial,
    )


def topic_message_count(settings: Settings, topic: str) -> int:
    return group_position(settings, "vtp-observer", [topic])[1]

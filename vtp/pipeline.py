"""Run the pipeline's processes as users do, and observe it from outside:
is it drained, and where did every raw message end up?"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from vtp.settings import Settings


def settings_env(settings: Settings, metrics_port: int = 0) -> dict[str, str]:
    """The environment that gives a child process the same settings."""
    env = dict(os.environ)
    env.update(
        {
            "VTP_KAFKA_BOOTSTRAP": settings.bootstrap(),
            "VTP_KAFKA_EXTRA": json.dumps(settings.kafka_extra),
            "VTP_DATA_DIR": str(settings.data_dir),
            "VTP_TOPIC_PREFIX": settings.topic_prefix,
            "VTP_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "VTP_REGIONS": ",".join(settings.regions),
            "VTP_SINK_BATCH_MESSAGES": str(settings.sink_batch_messages),
            "VTP_SINK_FLUSH_MS": str(settings.sink_flush_ms),
            "VTP_SINK_INSTANCE": settings.sink_instance,
            "VTP_WAREHOUSE": settings.warehouse,
            "VTP_METRICS_PORT": str(metrics_port),
            "VTP_API_HOST": settings.api_host,
            "VTP_API_PORT": str(settings.api_port),
            "VTP_API_SIGNING_KEY": settings.api_signing_key,
            "VTP_ALLOWED_LATENESS_S": str(settings.allowed_lateness_s),
            "VTP_TRIP_GAP_S": str(settings.trip_gap_s),
            "VTP_CHARGE_GAP_S": str(settings.charge_gap_s),
            "VTP_WORKER_STALL_S": str(settings.worker_stall_s),
        }
    )
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
    log_dir = settings.data_dir / "logs"
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
    return start_process(settings, "worker", "worker", metrics_port=metrics_port)


def start_sink(settings: Settings, region: str, metrics_port: int = 0) -> Process:
    return start_process(
        settings, f"sink-{region}", "sink", "--region", region, metrics_port=metrics_port
    )


def start_serve(settings: Settings, region: str, metrics_port: int = 0) -> Process:
    """`vtp serve --region R`: the region's sink and its owner API in one process."""
    return start_process(
        settings, f"serve-{region}", "serve", "--region", region, metrics_port=metrics_port
    )


def group_position(settings: Settings, group: str, topics: list[str]) -> tuple[int, int]:
    """(messages committed by ``group``, messages in ``topics``), summed over partitions."""
    for attempt in range(20):
        try:
            return _group_position(settings, group, topics)
        except KafkaException as exc:  # e.g. the group coordinator is still loading
            error = exc.args[0]
            if attempt == 19 or not (
                error.retriable() or error.code() == KafkaError.NOT_COORDINATOR
            ):
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _group_position(settings: Settings, group: str, topics: list[str]) -> tuple[int, int]:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap(), "group.id": group})
    committed_total, high_total = 0, 0
    try:
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None:
                continue
            tps = [TopicPartition(topic, p) for p in meta.partitions]
            for tp in consumer.committed(tps, timeout=10):
                low, high = consumer.get_watermark_offsets(tp, timeout=10)
                committed_total += (tp.offset if tp.offset >= 0 else low) - low
                high_total += high - low
    finally:
        consumer.close()
    return committed_total, high_total


def pipeline_groups(settings: Settings) -> dict[str, list[str]]:
    t = settings.topics
    groups = {
        f"{settings.topic_prefix}-validate": [t.uploads]
        + [t.validated(r) for r in settings.regions]
    }
    for region in settings.regions:
        groups[f"{settings.topic_prefix}-sink-{region}"] = [
            t.validated(region),
            t.aggregates(region),
        ]
    return groups


def pipeline_positions(settings: Settings) -> dict[str, tuple[int, int]]:
    """'group topic' -> (committed, total): where each consumer of the pipeline stands."""
    return {
        f"{group} {topic}": group_position(settings, group, [topic])
        for group, topics in pipeline_groups(settings).items()
        for topic in topics
    }


def pipeline_lag(settings: Settings) -> int:
    """Messages not yet committed by the worker (uploads, validated: it validates and
    aggregates) and the sinks (validated, aggregates)."""
    total = 0
    for group, topics in pipeline_groups(settings).items():
        committed, high = group_position(settings, group, topics)
        total += high - committed
    return total


class NotDrained(RuntimeError):
    """The pipeline still had messages to process when the wait ended; the message says
    where each consumer group stands and what each process last logged."""


def wait_drained(
    settings: Settings, processes: list[Process], timeout: float = 180.0, progress=None
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


def _not_drained_report(settings: Settings, processes: list[Process], timeout: float) -> str:
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
    samples are stored all the same, so they are not an outcome of the raw message."""

    deadlettered: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)
    too_late: int = 0

    @property
    def deadlettered_total(self) -> int:
        return sum(self.deadlettered.values())

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


def _read_to_end(settings: Settings, topic: str) -> dict[tuple[str, str], str]:
    """(vtp-stage, vtp-source) -> vtp-reason of every message in ``topic``."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap(),
            "group.id": f"vtp-observer-{os.getpid()}-{time.monotonic_ns()}",
            "enable.auto.commit": False,
        }
    )
    found: dict[tuple[str, str], str] = {}
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None:
            return found
        ends = {}
        assignment = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
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
                source = headers.get("vtp-source", f"{topic}:{m.partition()}:{m.offset()}")
                found[(headers.get("vtp-stage", ""), source)] = headers.get("vtp-reason", "unknown")
                if m.offset() + 1 >= ends.get(m.partition(), 0):
                    ends.pop(m.partition(), None)
        return found
    finally:
        consumer.close()


def read_outcomes(settings: Settings) -> Outcomes:
    dead = _read_to_end(settings, settings.topics.deadletter)
    # One raw message, one outcome: a replay after a crash may dead-letter the same
    # message again, even at another stage (refused by the worker, then by the sink).
    refused = {source: r for (stage, source), r in dead.items() if stage != "aggregate"}
    return Outcomes(
        deadlettered=Counter(refused.values()),
        quarantined=Counter(_read_to_end(settings, settings.topics.quarantine).values()),
        too_late=sum(1 for stage, _ in dead if stage == "aggregate"),
    )


def topic_message_count(settings: Settings, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap(), "group.id": "vtp-observer"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        total = 0
        for p in meta.partitions if meta else []:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()

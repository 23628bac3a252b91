"""Run a region's processes as users do, and observe it from outside: is it drained,
and where did every raw message end up? Functions that take several regions' settings
look at each region's own cluster."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from confluent_kafka import Consumer, Message, TopicPartition

from vtp.core import headers as h
from vtp.core.kafka import retry_kafka
from vtp.core.settings import Settings, as_environment


def settings_env(settings: Settings, metrics_port: int = 0) -> dict[str, str]:
    """The environment that gives a child process the same settings (every one of them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTP_")}
    env.update(as_environment(settings.with_(kafka_bootstrap=settings.bootstrap())))
    env["VTP_METRICS_PORT"] = str(metrics_port)
    return env


# `vtp worker` exits with this to be started again (stream_jobs.faust_fixes.exit_for_restart):
# EX_TEMPFAIL. A supervisor (Kubernetes, systemd, this harness) starts it again and counts.
EXIT_RESTART = 75


@dataclass
class Process:
    """A child process, and for those that ask to be restarted (``restart_on``), their
    supervisor: a thread that starts the same command again when it exits with one of
    those codes, notes each restart in its log, and gives up after ``max_restarts``
    within ``restart_window_s`` (a crash loop stays visible instead of spinning)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restart_on: frozenset[int] = frozenset()
    max_restarts: int = 5
    restart_window_s: float = 300.0
    restarts: int = 0
    _stopping: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _supervisor: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.restart_on:
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"supervise-{self.name}", daemon=True
            )
            self._supervisor.start()

    def _supervise(self) -> None:
        recent: list[float] = []
        while True:
            code = self.popen.wait()
            with self._lock:
                if self._stopping or code not in self.restart_on:
                    return
                now = time.monotonic()
                recent = [t for t in recent if now - t < self.restart_window_s] + [now]
                if len(recent) > self.max_restarts:
                    self._note(
                        f"exited with {code} for the {len(recent)}th time in "
                        f"{self.restart_window_s:.0f} s; giving up (crash loop)"
                    )
                    return
                self.restarts += 1
                self._note(f"exited with {code}; starting it again (restart {self.restarts})")
                self.popen = _spawn(self.command, self.env, self.log_path)

    def _note(self, what: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"[supervisor] {self.name} {what}\n")

    def exited(self) -> int | None:
        """The exit code once the process has ended for good (not about to be started
        again by its supervisor); None while it runs."""
        if self._supervisor is not None and self._supervisor.is_alive():
            return None
        return self.popen.poll()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM by our own pid, then SIGKILL if it does not end in time."""
        with self._lock:
            self._stopping = True
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def kill(self) -> None:
        with self._lock:
            self._stopping = True
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child from here on
    try:
        return subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    finally:
        log_file.close()


def start_process(
    settings: Settings,
    name: str,
    *args: str,
    metrics_port: int = 0,
    module: str = "vtp.cli",
    restart_on: frozenset[int] = frozenset(),
) -> Process:
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    command = [sys.executable, "-m", module, *args]
    env = settings_env(settings, metrics_port)
    return Process(name, _spawn(command, env, log_path), log_path, command, env, restart_on)


def start_worker(settings: Settings, metrics_port: int = 0, module: str = "vtp.cli") -> Process:
    """`vtp worker`, started again whenever it asks to be (EXIT_RESTART)."""
    return start_process(
        settings,
        f"worker-{settings.need_region()}",
        "worker",
        metrics_port=metrics_port,
        module=module,
        restart_on=frozenset({EXIT_RESTART}),
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


def start_gateway(
    settings: Settings, metrics_port: int = 0, timeout: float = 60.0
) -> tuple[Process, str]:
    """`vtp gateway` for the region's vehicles, once it listens: the process and its URL."""
    import json

    where = settings.home / "gateway.json"
    where.unlink(missing_ok=True)
    process = start_process(
        settings, f"gateway-{settings.need_region()}", "gateway", metrics_port=metrics_port
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.exited() is not None:
            raise RuntimeError(f"vtp gateway exited ({process.exited()}):\n{process.log_tail()}")
        try:
            state = json.loads(where.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        if state.get("pid") == process.popen.pid:
            return process, str(state["url"])
        time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"vtp gateway did not listen within {timeout:.0f} s:\n{process.log_tail()}")


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
            # functools.partial, not lambdas with defaults: mypy cannot infer those against
            # retry_kafka's Callable[[], T].
            meta = retry_kafka(
                functools.partial(consumer.list_topics, topic, timeout=10), "metadata"
            )
            found = meta.topics.get(topic)
            if found is None:
                continue
            tps = [TopicPartition(topic, p) for p in found.partitions]
            committed = retry_kafka(
                functools.partial(consumer.committed, tps, timeout=10), "committed"
            )
            for tp in committed:
                low, high = retry_kafka(
                    functools.partial(consumer.get_watermark_offsets, tp, timeout=10), "watermarks"
                )
                committed_total += (tp.offset if tp.offset >= 0 else low) - low
                high_total += high - low
    finally:
        consumer.close()
    return committed_total, high_total


def pipeline_groups(settings: Settings) -> dict[str, list[str]]:
    t = settings.topics
    return {
        t.worker_app: [t.vehicles, t.uploads, t.control],
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
    progress: Callable[[int], object] | None = None,
) -> bool:
    """True once every consumer of the pipeline has committed everything; raises
    NotDrained (with the evidence) after ``timeout`` seconds, or when a process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in processes:
            code = p.exited()
            if code is not None:
                raise NotDrained(f"{p.name} exited with {code}:\n{p.log_tail()}")
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

    deadlettered: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)
    too_late: int = 0
    partial: Counter[str] = field(default_factory=Counter)

    @property
    def deadlettered_total(self) -> int:
        return sum(self.deadlettered.values())

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


def _messages_to_end(settings: Settings, topic: str) -> Iterator[Message]:
    """Every message ``topic`` holds now, each partition in its order (read by an observer
    that commits nothing); gives up after a minute."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap(),
            "group.id": f"vtp-observer-{os.getpid()}-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            **settings.kafka_extra,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        ends = {}
        assignment = []
        for p in meta.partitions if meta else ():
            # A def, not a lambda with defaults: mypy cannot infer those against
            # retry_kafka's Callable[[], T].
            def watermarks(p: int = p) -> tuple[int, int]:
                return consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)

            low, high = retry_kafka(watermarks, "watermarks")
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        deadline = time.monotonic() + 60
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=1.0):
                if m.error():
                    continue
                offset = m.offset()
                assert offset is not None  # the stub makes it optional; a message has one
                yield m
                if offset + 1 >= ends.get(m.partition(), 0):
                    ends.pop(m.partition(), None)
    finally:
        consumer.close()


def _read_to_end(settings: Settings, topic: str) -> dict[tuple[str, str], tuple[str, int | None]]:
    """(vtp-stage, vtp-source) -> (vtp-reason, vtp-partial) of every message in ``topic``."""
    found: dict[tuple[str, str], tuple[str, int | None]] = {}
    for m in _messages_to_end(settings, topic):
        # A consumed message's headers are a list of pairs; the stub's type also admits
        # the dict a producer may be given.
        pairs = cast("list[tuple[str, bytes | None]] | None", m.headers())
        headers = {k: (v or b"").decode() for k, v in (pairs or [])}
        source = headers.get(h.SOURCE, f"{topic}:{m.partition()}:{m.offset()}")
        partial = headers.get(h.PARTIAL)
        found[(headers.get(h.STAGE, ""), source)] = (
            headers.get(h.REASON, "unknown"),
            int(partial) if partial else None,
        )
    return found


def stored_uploads(settings: Settings) -> int:
    """Uploads the region's warehouse holds (opened for this count, then closed)."""
    from vtp.core.warehouse import open_warehouse, rows

    warehouse = open_warehouse(settings)
    try:
        count: int = rows(warehouse.query("SELECT count() FROM uploads"))[0][0]
        return count
    finally:
        warehouse.close()


def read_outcomes(settings: Settings) -> Outcomes:
    """What the region's dead-letter and quarantine topics hold, per raw message."""
    dead = _read_to_end(settings, settings.topics.deadletter)
    # One raw message, one outcome: a replay after a crash may dead-letter the same
    # message again, even at another stage (refused by the worker, then by the sink).
    refused = {source: r for (stage, source), (r, _) in dead.items() if stage != "aggregate"}
    quarantine = _read_to_end(settings, settings.topics.quarantine)
    whole = {source: r for (_, source), (r, partial) in quarantine.items() if partial is None}
    partial: Counter[str] = Counter()
    for (_, source), (reason, samples) in quarantine.items():
        if samples is not None and source not in whole:
            partial[reason] += samples
    return Outcomes(
        deadlettered=Counter(refused.values()),
        quarantined=Counter(whole.values()),
        too_late=sum(1 for stage, _ in dead if stage == "aggregate"),
        partial=partial,
    )


def vehicle_upload_ids(settings: Settings, vin: str) -> list[str]:
    """The upload ids of every message keyed ``vin`` in the region's uploads topic, in
    the topic's order (a VIN's uploads share one partition); "?" for one that does not
    decode."""
    from schemas import default_store

    store = default_store()
    key = vin.encode()
    found: list[str] = []
    for m in _messages_to_end(settings, settings.topics.uploads):
        if m.key() == key:
            try:
                found.append(str(store.decode(m.value() or b"")[0]["upload_id"]))
            except (ValueError, KeyError):
                found.append("?")
    return found


def topic_message_count(settings: Settings, topic: str) -> int:
    return group_position(settings, "vtp-observer", [topic])[1]

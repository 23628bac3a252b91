"""The local broker: Apache Kafka (KRaft, broker+controller in one JVM) run from its
Maven Central jars on the installed JDK, on a free loopback port, stopped by its pid.

    fetch_jars(settings)      resolve the pinned jars into .cache/kafka/<version>/libs
    start_broker(settings)    format storage once, start, wait until it answers
    stop_broker(settings)     SIGTERM, then SIGKILL, by the pid in the state file
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from vtp.settings import Settings

DEPLOY_DIR = Path(__file__).resolve().parent


class BrokerError(RuntimeError):
    """The local broker cannot be fetched, started or stopped; the message says why."""


@dataclass(frozen=True)
class BrokerState:
    pid: int
    bootstrap: str
    port: int
    controller_port: int
    data_dir: str
    log_path: str
    version: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> BrokerState:
        return cls(**json.loads(text))


def broker_dir(settings: Settings) -> Path:
    return settings.data_dir / "broker"


def _state_file(settings: Settings) -> Path:
    return broker_dir(settings) / "state.json"


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise BrokerError(
            "java not found on PATH (nor in JAVA_HOME): install a JDK 17, "
            "e.g. apt-get install openjdk-17-jdk-headless"
        )
    return found


def jars_dir(settings: Settings) -> Path:
    return settings.cache_dir / "kafka" / settings.kafka_version / "libs"


def fetch_jars(settings: Settings) -> Path:
    """Resolve the pinned Kafka jars once; later calls (and runs) are offline."""
    libs = jars_dir(settings)
    marker = libs.parent / ".complete"
    if marker.exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two callers at once: the second waits
        if marker.exists():
            return libs
        mvn = shutil.which("mvn")
        if not mvn:
            raise BrokerError("mvn not found on PATH: install Maven, e.g. apt-get install maven")
        _java()
        pom = libs.parent / "pom.xml"
        shutil.copy(DEPLOY_DIR / "kafka-pom.xml", pom)
        shutil.rmtree(libs, ignore_errors=True)
        done = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
             f"-Dkafka.version={settings.kafka_version}", "-DincludeScope=runtime",
             f"-DoutputDirectory={libs}"],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise BrokerError(
                f"Maven could not resolve Apache Kafka {settings.kafka_version} "
                f"(exit {done.returncode}):\n{tail}"
            )
        marker.write_text(settings.kafka_version)
    return libs


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_is_broker(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ProcessLookupError):
        return False
    return b"kafka.Kafka" in cmdline  # not a recycled pid of something else


def read_state(settings: Settings) -> BrokerState | None:
    """The running local broker, or None (no state file, or its process is gone)."""
    path = _state_file(settings)
    try:
        state = BrokerState.from_json(path.read_text())
    except (OSError, ValueError, TypeError):
        return None
    return state if _pid_is_broker(state.pid) else None


def _server_properties(data: Path, port: int, controller_port: int) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={data}",
            "num.partitions=4",
            # One broker: every internal topic has one replica.
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "",
        ]
    )


def wait_until_answers(bootstrap: str, timeout: float, process: subprocess.Popen | None = None,
                       log_path: Path | None = None) -> None:  # fmt: skip
    """Poll with metadata requests until the broker answers; fail fast if it exits."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerError(
                f"broker exited during start-up (code {process.returncode}); last log lines:\n"
                + _tail(log_path)
            )
        try:
            metadata = admin.list_topics(timeout=2)
            if metadata.brokers:
                return
        except Exception:  # KafkaException while it is still starting
            time.sleep(0.3)
    raise BrokerError(
        f"broker did not answer a metadata request within {timeout:.0f} s; log: {log_path}"
    )


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_broker(settings: Settings, timeout: float = 90.0) -> BrokerState:
    running = read_state(settings)
    if running is not None:
        raise BrokerError(
            f"a broker already runs (pid {running.pid}) at {running.bootstrap}; "
            "`vtp stack down` first"
        )
    java = _java()
    libs = fetch_jars(settings)
    home = broker_dir(settings)
    data, logs = home / "data", home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _state_file(settings).unlink(missing_ok=True)  # stale: its process is gone

    port = settings.broker_port or _free_port()
    if settings.broker_port and not _port_is_free(port):
        raise BrokerError(
            f"port 127.0.0.1:{port} is already in use: stop what listens there "
            "or unset VTP_BROKER_PORT to pick a free port"
        )
    controller_port = _free_port()
    while controller_port == port:
        controller_port = _free_port()
    properties = home / "server.properties"
    properties.write_text(_server_properties(data, port, controller_port))
    classpath = f"{libs}/*"
    if not (data / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        formatted = subprocess.run(
            [java, "-cp", classpath, "kafka.tools.StorageTool", "format",
             "-t", cluster_id, "-c", str(properties)],
            capture_output=True, text=True,
        )  # fmt: skip
        if formatted.returncode != 0:
            raise BrokerError(f"formatting {data} failed:\n{formatted.stdout}{formatted.stderr}")

    log_path = logs / "broker.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [java, "-Xms256m", "-Xmx1g", "-XX:+UseG1GC",
             f"-Dlog4j2.configurationFile={DEPLOY_DIR / 'log4j2.yaml'}",
             "-cp", classpath, "kafka.Kafka", str(properties)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `vtp stack up`; stopped by its pid
        )  # fmt: skip
    bootstrap = f"127.0.0.1:{port}"
    try:
        wait_until_answers(bootstrap, timeout, process, log_path)
    except BrokerError:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        raise
    state = BrokerState(
        pid=process.pid, bootstrap=bootstrap, port=port, controller_port=controller_port,
        data_dir=str(data), log_path=str(log_path), version=settings.kafka_version,
    )  # fmt: skip
    _state_file(settings).write_text(state.to_json())
    return state


def stop_broker(settings: Settings, timeout: float = 30.0) -> bool:
    """Stop the broker whose pid the state file names; True if one was running."""
    state = read_state(settings)
    _state_file(settings).unlink(missing_ok=True)
    if state is None:
        return False
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_is_broker(state.pid) or _is_zombie(state.pid):
            _reap(state.pid)
            return True
        time.sleep(0.2)
    os.kill(state.pid, signal.SIGKILL)
    _reap(state.pid)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _reap(pid: int) -> None:
    """Collect the exit status when the broker is our own child (tests, demo)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def broker_status(settings: Settings) -> str:
    state = read_state(settings)
    if state is None:
        return f"no local broker running (state in {broker_dir(settings)})"
    return (
        f"Apache Kafka {state.version} running: pid {state.pid} at {state.bootstrap} "
        f"(controller :{state.controller_port}), data {state.data_dir}, log {state.log_path}"
    )

"""The local broker: Apache Kafka (KRaft, broker+controller in one JVM) run from its
Maven Central jars on the installed JDK, on a free loopback port, stopped by its pid.

    fetch_jars(settings)      resolve the pinned jars into .cache/kafka/<version>/libs
    start_broker(settings)    format storage once, start, wait until it answers
    stop_broker(settings)     SIGTERM, then SIGKILL, by the pid in the state file

The state file (<data_dir>/<region>/broker/state.json) is written only once the broker answers,
so its presence with a live pid means "a usable broker runs here".
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from vtp.core.settings import Settings

DEPLOY_DIR = Path(__file__).resolve().parent
MAVEN_TIMEOUT_S = 900.0


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
    secure_bootstrap: str = ""  # the SASL_SSL listener, when started with one

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> BrokerState:
        return cls(**json.loads(text))


SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


@dataclass(frozen=True)
class SecureListener:
    """A SASL_SSL listener beside the plaintext one, for testing the clients' security
    the way a deployed cluster asks for it (TLS, SCRAM-SHA-512)."""

    keystore: Path  # the broker's PKCS#8 private key and certificate chain, PEM
    scram_users: dict[str, str]  # user -> password, made when the storage is formatted

    def properties(self, port: int) -> list[str]:
        return [
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={SCRAM_LOGIN}",
            "listener.name.sasl_ssl.ssl.keystore.type=PEM",
            f"listener.name.sasl_ssl.ssl.keystore.location={self.keystore}",
        ]

    def format_arguments(self) -> list[str]:
        return [
            a
            for user, password in self.scram_users.items()
            for a in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]")
        ]


def broker_dir(settings: Settings) -> Path:
    """The broker of the settings' region (each region has a cluster of its own)."""
    return settings.home / "broker"


def jars_dir(settings: Settings) -> Path:
    return settings.cache_dir / "kafka" / settings.kafka_version / "libs"


def _state_file(settings: Settings) -> Path:
    return broker_dir(settings) / "state.json"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes; the kernel drops it if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --- tools -----------------------------------------------------------------------------


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home:
        # Maven obeys JAVA_HOME too, so a wrong one must be fixed rather than skipped.
        java = Path(home) / "bin" / "java"
        if not java.exists():
            raise BrokerError(f"JAVA_HOME={home} has no bin/java: point it at a JDK 17 or unset it")
        return str(java)
    found = shutil.which("java")
    if not found:
        raise BrokerError(
            "java not found on PATH: install OpenJDK 17 "
            "(apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
        )
    return found


def mvn_path() -> str:
    found = shutil.which("mvn")
    if not found:
        raise BrokerError(
            "mvn not found on PATH: install Maven (apt-get install maven); "
            "it is needed once to download the Kafka jars from Maven Central"
        )
    return found


# --- jars ------------------------------------------------------------------------------


def fetch_jars(settings: Settings) -> Path:
    """Resolve the pinned Kafka jars once; later calls (and runs) are offline."""
    libs = jars_dir(settings)
    marker = libs.parent / ".complete"
    if marker.exists():
        return libs
    with locked(libs.parent / ".lock"):  # a concurrent caller waits, then finds the marker
        if marker.exists():
            return libs
        mvn = mvn_path()
        _java()  # Maven needs it too; say so before Maven says it less clearly
        _run_maven(mvn, settings.kafka_version, libs)
        marker.write_text(settings.kafka_version)
    return libs


def _run_maven(mvn: str, version: str, libs: Path) -> None:
    pom = libs.parent / "pom.xml"
    shutil.copy(DEPLOY_DIR / "kafka-pom.xml", pom)
    shutil.rmtree(libs, ignore_errors=True)  # a half-copied earlier attempt
    command = [
        # -U: retry what an earlier attempt (say, offline) left marked "not found" in ~/.m2.
        mvn,
        "-q",
        "-B",
        "-U",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-Dkafka.version={version}",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={libs}",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=MAVEN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BrokerError(
            f"Maven did not finish resolving Apache Kafka {version} within "
            f"{MAVEN_TIMEOUT_S:.0f} s: check access to Maven Central (repo.maven.apache.org)"
        ) from None
    if done.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        raise BrokerError(
            f"Maven could not resolve Apache Kafka {version} (exit {done.returncode}); "
            f"check the version and access to Maven Central. Maven said:\n"
            + maven_error(done.stdout + done.stderr)
        )


def maven_error(output: str) -> str:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)  # Maven colours even in batch mode
    lines = [line for line in plain.splitlines() if line.strip()]
    # The first [ERROR] line carries the cause; the rest is Maven's generic advice.
    errors = [line for line in lines if line.startswith("[ERROR]") and line[7:].strip()][:1]
    return "\n".join(errors or lines[-15:])


# --- processes and ports ---------------------------------------------------------------


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the JVM does: a port in TIME_WAIT after a restart still counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(*avoid: int) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in avoid:
            return port


def _pick_port(wanted: int) -> int:
    if not wanted:
        return _free_port()
    if not _port_is_free(wanted):
        raise BrokerError(
            f"port 127.0.0.1:{wanted} is already in use: stop what listens there "
            "or unset VTP_BROKER_PORT to pick a free port"
        )
    return wanted


def _pid_is_broker(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # Guards against a recycled pid; a zombie has an empty cmdline, so it counts as gone.
    return b"kafka.Kafka" in cmdline


# Brokers this process launched, by pid: the broker outlives start_broker (its state file
# names it), and a Popen dropped while its process runs is a leak Python warns about.
_LAUNCHED: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int, timeout: float = 10.0) -> None:
    """Collect the exit status when the broker is our own child (tests, demo).

    Its cmdline empties while it is still exiting, before it becomes a zombie, so one
    WNOHANG wait can come too early and leave the zombie behind: wait until it is reaped."""
    launched = _LAUNCHED.pop(pid, None)
    if launched is not None:
        try:
            launched.wait(timeout)
        except subprocess.TimeoutExpired:
            _LAUNCHED[pid] = launched  # still exiting: the next stop reaps it
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child, or already collected
            return
        if reaped == pid or time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not _pid_is_broker(pid):
            _reap(pid)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited between check and signal
        os.kill(pid, sig)


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return "(no log)"
    # Without stack frames, so the exception's own message is among the last lines.
    text = path.read_text(errors="replace").splitlines()
    return "\n".join([line for line in text if not line.startswith("\t")][-lines:])


def _unrecorded_pid(properties: Path) -> int | None:
    """A broker on these properties that has no state file (its start was cut short)."""
    wanted = str(properties).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" in args and wanted in args:
            return int(proc.name)
    return None


# --- state -----------------------------------------------------------------------------


def with_local_broker(settings: Settings) -> Settings:
    """``settings`` pointed at the broker `vtp stack up` started for its region, unless
    VTP_KAFKA_BOOTSTRAP already names one (or none runs: ``bootstrap()`` then says so)."""
    if settings.kafka_bootstrap or not settings.region:
        return settings
    state = read_state(settings)
    return settings.with_(kafka_bootstrap=state.bootstrap) if state else settings


def read_state(settings: Settings) -> BrokerState | None:
    """The running local broker, or None (no state file, or its process is gone)."""
    try:
        state = BrokerState.from_json(_state_file(settings).read_text())
    except (OSError, ValueError, TypeError):
        return None
    return state if _pid_is_broker(state.pid) else None


def _write_state(settings: Settings, state: BrokerState) -> None:
    # Replace, not overwrite: other processes read it to find the bootstrap address.
    path = _state_file(settings)
    partial = path.with_suffix(".json.partial")
    partial.write_text(state.to_json())
    os.replace(partial, path)


# --- start -----------------------------------------------------------------------------


def wait_until_answers(
    bootstrap: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll with metadata requests until a broker answers; fail fast if `process` exits."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # log_level 0: "connection refused" while the JVM starts is expected, not news.
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise BrokerError(
                f"broker exited during start-up (code {process.returncode}); "
                f"last log lines:\n{_tail(log_path)}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            if admin.list_topics(timeout=min(2.0, max(remaining, 0.1))).brokers:
                return
        except KafkaException:
            pass  # not listening yet, or still electing itself controller
        time.sleep(0.2)
    where = f"log: {log_path}" if log_path else f"at {bootstrap}"
    raise BrokerError(f"broker did not answer a metadata request within {timeout:.0f} s; {where}")


def _refuse_if_running(settings: Settings) -> None:
    state = read_state(settings)
    if state is None:
        _state_file(settings).unlink(missing_ok=True)  # stale: its process is gone
        orphan = _unrecorded_pid(broker_dir(settings) / "server.properties")
        if orphan is not None:
            # It holds the data dir's lock, so a new JVM would only fail on it.
            raise BrokerError(
                f"a broker process (pid {orphan}) runs on {broker_dir(settings)} without a "
                f"state file (its start was interrupted): `kill {orphan}`, then start again"
            )
        return
    try:
        wait_until_answers(state.bootstrap, 5.0)
    except BrokerError:
        # A second JVM could not lock the same data dir anyway, so say what to do now.
        raise BrokerError(
            f"a broker process (pid {state.pid}) runs but does not answer at {state.bootstrap}; "
            f"`vtp stack down` first (log: {state.log_path})"
        ) from None
    raise BrokerError(
        f"a broker already runs (pid {state.pid}) at {state.bootstrap}; `vtp stack down` first"
    )


def _server_properties(
    data: Path,
    port: int,
    controller_port: int,
    secure: SecureListener | None = None,
    secure_port: int = 0,
) -> str:
    plain = f"PLAINTEXT://127.0.0.1:{port}"
    served = f"{plain},SASL_SSL://127.0.0.1:{secure_port}" if secure else plain
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            # Static voters, not a formatted --standalone quorum: the controller port can
            # then change on every start (it lives only in this file, not in the storage).
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners={served},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners={served}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            *(secure.properties(secure_port) if secure else []),
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
            # Tests and the demo start consumers right away; no reason to wait 3 s.
            "group.initial.rebalance.delay.ms=0",
            # A producer or consumer pointed at the wrong cluster must fail, not create
            # its region's topics there (vtp creates its topics itself: vtp topics).
            "auto.create.topics.enable=false",
            "",
        ]
    )


def _format_once(
    java: str, libs: Path, data: Path, properties: Path, extra: list[str] | None = None
) -> None:
    if (data / "meta.properties").exists():
        return
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    formatted = subprocess.run(
        # "=" form: an id that starts with "-" (one in 32) would otherwise be taken for
        # an option ("argument --cluster-id/-t: expected one argument").
        [
            java,
            "-cp",
            f"{libs}/*",
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            "-c",
            str(properties),
            *(extra or []),
        ],
        capture_output=True,
        text=True,
    )
    if formatted.returncode != 0:
        tail = "\n".join((formatted.stdout + formatted.stderr).splitlines()[-15:])
        raise BrokerError(
            f"formatting the broker storage {data} failed (exit {formatted.returncode}); "
            f"remove that directory to start empty. StorageTool said:\n{tail}"
        )


def _launch(java: str, libs: Path, properties: Path, log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        # Keep the previous run's log for a post-mortem; the tail on failure is this run's.
        log_path.replace(log_path.with_name(log_path.name + ".1"))
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                java,
                "-Xms256m",
                "-Xmx1g",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={DEPLOY_DIR / 'log4j2.yaml'}",
                "-cp",
                f"{libs}/*",
                "kafka.Kafka",
                str(properties),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `vtp stack up` and its Ctrl-C; stopped by pid
        )


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def start_broker(
    settings: Settings, timeout: float = 90.0, secure: SecureListener | None = None
) -> BrokerState:
    """Start the local broker and return once it answers metadata requests; with
    ``secure``, a SASL_SSL listener too (BrokerState.secure_bootstrap)."""
    home = broker_dir(settings)
    with locked(home / ".start.lock"):  # a concurrent `stack up` waits, then is refused
        _refuse_if_running(settings)
        java = _java()
        port = _pick_port(settings.broker_port)
        controller_port = _free_port(port)
        secure_port = _free_port(port, controller_port) if secure else 0
        libs = fetch_jars(settings)
        data, log_path = home / "data", home / "logs" / "broker.log"
        properties = home / "server.properties"
        properties.write_text(_server_properties(data, port, controller_port, secure, secure_port))
        _format_once(java, libs, data, properties, secure.format_arguments() if secure else None)
        process = _launch(java, libs, properties, log_path)
        bootstrap = f"127.0.0.1:{port}"
        try:
            wait_until_answers(bootstrap, timeout, process, log_path)
        except BaseException:  # Ctrl-C included: no orphan JVM without a state file
            _kill(process)
            raise
        _LAUNCHED[process.pid] = process
        state = BrokerState(
            pid=process.pid,
            bootstrap=bootstrap,
            port=port,
            controller_port=controller_port,
            data_dir=str(data),
            log_path=str(log_path),
            version=settings.kafka_version,
            secure_bootstrap=f"127.0.0.1:{secure_port}" if secure else "",
        )
        _write_state(settings, state)
    return state


# --- stop and status -------------------------------------------------------------------


def stop_broker(settings: Settings, timeout: float = 30.0) -> bool:
    """Stop the broker whose pid the state file names; True if one was running."""
    state = read_state(settings)
    if state is not None:
        _signal(state.pid, signal.SIGTERM)  # Kafka shuts down cleanly: no log recovery next time
        if not _wait_gone(state.pid, timeout):
            _signal(state.pid, signal.SIGKILL)
            _wait_gone(state.pid, 10.0)
    _state_file(settings).unlink(missing_ok=True)
    return state is not None


def broker_status(settings: Settings) -> str:
    state = read_state(settings)
    if state is None:
        return f"no local broker running (state in {broker_dir(settings)})"
    return (
        f"Apache Kafka {state.version} running: pid {state.pid} at {state.bootstrap} "
        f"(controller :{state.controller_port}), data {state.data_dir}, log {state.log_path}"
    )

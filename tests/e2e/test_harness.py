"""The harness supervises a worker the way Kubernetes or systemd would: a process that
exits asking to be restarted is started again, each restart is on record, a crash loop
ends, and a process the test killed stays down."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from vtp.harness import EXIT_RESTART, Process, _spawn

pytestmark = pytest.mark.e2e


def supervised(tmp_path, code: str, **limits) -> Process:
    command = [sys.executable, "-c", code]
    env = {**os.environ, "MARKER": str(tmp_path / "ran-once")}
    log = tmp_path / "child.log"
    return Process(
        "child", _spawn(command, env, log), log, command, env, frozenset({EXIT_RESTART}), **limits
    )


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


EXITS_ONCE = f"""
import os, pathlib, sys, time
marker = pathlib.Path(os.environ["MARKER"])
if not marker.exists():
    marker.touch()
    sys.exit({EXIT_RESTART})
print("second start", flush=True)
time.sleep(60)
"""


def test_a_process_asking_to_restart_is_started_again_and_counted(tmp_path):
    child = supervised(tmp_path, EXITS_ONCE)
    try:
        wait_until(lambda: "second start" in child.log_path.read_text())
        assert child.restarts == 1 and child.exited() is None
        assert "[supervisor] child exited with 75; starting it again (restart 1)" in (
            child.log_path.read_text()
        )
    finally:
        assert child.stop() == -signal.SIGTERM
    assert child.exited() == -signal.SIGTERM and child.restarts == 1


def test_a_crash_loop_ends_and_says_so(tmp_path):
    child = supervised(tmp_path, f"import sys; sys.exit({EXIT_RESTART})", max_restarts=3)
    wait_until(lambda: child.exited() is not None)
    assert child.exited() == EXIT_RESTART and child.restarts == 3
    assert "for the 4th time in 300 s; giving up (crash loop)" in child.log_path.read_text()


def test_a_process_that_fails_otherwise_or_is_killed_stays_down(tmp_path):
    failed = supervised(tmp_path, "import sys; sys.exit(70)")
    wait_until(lambda: failed.exited() is not None)
    assert failed.exited() == 70 and failed.restarts == 0
    killed = supervised(tmp_path, "import time; time.sleep(60)")
    os.kill(killed.popen.pid, signal.SIGKILL)
    wait_until(lambda: killed.exited() is not None)
    assert killed.exited() == -signal.SIGKILL and killed.restarts == 0

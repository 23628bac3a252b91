"""`vtp` as users type it, in fresh processes."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def vtp(*args, data_dir, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VTP_")}
    full_env.update({"VTP_DATA_DIR": str(data_dir), **env})
    return subprocess.run(
        [sys.executable, "-m", "vtp.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_stack_up_status_topics_down(tmp_path):
    up = vtp("stack", "up", data_dir=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        assert "export VTP_KAFKA_BOOTSTRAP=127.0.0.1:" in up.stdout
        assert "vtp.uploads" in up.stdout  # topics created with the stack
        status = vtp("stack", "status", data_dir=tmp_path)
        assert "running: pid" in status.stdout
        again = vtp("topics", data_dir=tmp_path)  # finds the broker through the state file
        assert again.returncode == 0 and "none (all existed)" in again.stdout
        twice = vtp("stack", "up", data_dir=tmp_path)
        assert twice.returncode == 1 and "already runs" in twice.stderr
    finally:
        down = vtp("stack", "down", data_dir=tmp_path)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert "no local broker" in vtp("stack", "status", data_dir=tmp_path).stdout


def test_errors_are_one_clear_line(tmp_path):
    no_broker = vtp("topics", data_dir=tmp_path)
    assert no_broker.returncode == 2 and "vtp stack up" in no_broker.stderr
    bad_setting = vtp("config", data_dir=tmp_path, VTP_SINK_BATCH_MESSAGES="lots")
    assert bad_setting.returncode == 2 and "VTP_SINK_BATCH_MESSAGES='lots'" in bad_setting.stderr
    region = vtp("owner", "report", "o-1", "--region", "us", data_dir=tmp_path)
    assert region.returncode == 2 and "unknown region 'us'" in region.stderr
    sink = vtp("sink", "--region", "us", data_dir=tmp_path, VTP_KAFKA_BOOTSTRAP="127.0.0.1:9")
    assert sink.returncode == 1 and "not one of VTP_REGIONS" in sink.stderr
    assert "Traceback" not in no_broker.stderr + bad_setting.stderr + region.stderr + sink.stderr


def test_config_lists_every_variable(tmp_path):
    out = vtp("config", data_dir=tmp_path, VTP_REGIONS="cn")
    assert out.returncode == 0
    assert "VTP_REGIONS=cn  (default cn,eu)" in out.stdout
    assert "VTP_WAREHOUSE=chdb" in out.stdout


def test_token_and_serve_refuse_what_they_cannot_do_in_one_line(tmp_path):
    import socket

    from owner_api.tokens import verify

    token = vtp("token", "owner-0001", "--region", "eu", "--ttl", "60", data_dir=tmp_path)
    assert token.returncode == 0, token.stderr
    key = (tmp_path / "owner_api" / "signing.key").read_text().strip()
    claims = verify(key, token.stdout.strip())  # signed with the key the service will use
    assert (claims.owner_id, claims.region, claims.is_owner) == ("owner-0001", "eu", True)

    wrong = vtp("token", "owner-0001", "--region", "us", data_dir=tmp_path)
    assert wrong.returncode == 2 and "region 'us' is not one of" in wrong.stderr
    assert vtp("serve", "--region", "us", data_dir=tmp_path).returncode == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = vtp("serve", "--region", "eu", data_dir=tmp_path, VTP_API_PORT=str(port))
    assert busy.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "Traceback" not in busy.stderr


def test_a_stalled_worker_restarts_as_the_same_command_in_the_same_process(tmp_path):
    # restart_in_place is what the worker's stall watchdog calls: `vtp <same args>` by exec.
    code = (
        "import os, sys; print('pid', os.getpid(), flush=True); sys.argv = ['vtp', 'config'];"
        "from stream_jobs.faust_fixes import restart_in_place; restart_in_place()"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTP_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**env, "VTP_DATA_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pid ") and "VTP_WORKER_STALL_S" in done.stdout

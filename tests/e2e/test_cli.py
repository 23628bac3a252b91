"""`vtp` as users type it, in fresh processes."""

import os
import subprocess
import sys

import pytest

from vtp.harness import EXIT_RESTART

pytestmark = pytest.mark.e2e


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


def test_stack_up_status_topics_down_per_region(tmp_path):
    up = vtp("stack", "up", "--region", "eu", data_dir=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        assert "export VTP_REGION=eu VTP_KAFKA_BOOTSTRAP=127.0.0.1:" in up.stdout
        assert "vtp.eu.uploads" in up.stdout  # the region's topics, created with its stack
        assert (tmp_path / "eu" / "broker" / "state.json").exists()
        status = vtp("stack", "status", data_dir=tmp_path, VTP_REGION="eu")
        assert "running: pid" in status.stdout
        # the other region has no broker of its own yet: nothing is shared
        assert (
            "no local broker" in vtp("stack", "status", "--region", "cn", data_dir=tmp_path).stdout
        )
        again = vtp("topics", data_dir=tmp_path, VTP_REGION="eu")  # found by the state file
        assert again.returncode == 0 and "none (all existed)" in again.stdout
        twice = vtp("stack", "up", "--region", "eu", data_dir=tmp_path)
        assert twice.returncode == 1 and "already runs" in twice.stderr
        fewer = vtp("topics", data_dir=tmp_path, VTP_REGION="eu", VTP_TOPIC_PARTITIONS="2")
        assert (
            fewer.returncode == 1 and "has 4 partitions, VTP_TOPIC_PARTITIONS is 2" in fewer.stderr
        )
    finally:
        down = vtp("stack", "down", "--region", "eu", data_dir=tmp_path)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert "no local broker" in vtp("stack", "status", "--region", "eu", data_dir=tmp_path).stdout


def test_errors_are_one_clear_line(tmp_path):
    no_broker = vtp("topics", "--region", "cn", data_dir=tmp_path)
    assert no_broker.returncode == 2 and "vtp stack up --region cn" in no_broker.stderr
    no_region = vtp("worker", data_dir=tmp_path)
    assert no_region.returncode == 2 and "set VTP_REGION or pass --region" in no_region.stderr
    bad_setting = vtp("config", data_dir=tmp_path, VTP_SINK_BATCH_MESSAGES="lots")
    assert bad_setting.returncode == 2 and "VTP_SINK_BATCH_MESSAGES='lots'" in bad_setting.stderr
    region = vtp("owner", "report", "o-1", "--region", "us", data_dir=tmp_path)
    assert region.returncode == 2 and "region 'us' is not one of cn, eu" in region.stderr
    sink = vtp("sink", data_dir=tmp_path, VTP_REGION="us", VTP_KAFKA_BOOTSTRAP="127.0.0.1:9")
    assert sink.returncode == 2 and "region 'us' is not one of cn, eu" in sink.stderr
    errors = no_broker.stderr + no_region.stderr + bad_setting.stderr + region.stderr + sink.stderr
    assert "Traceback" not in errors


def test_config_lists_every_variable_and_prints_no_secret(tmp_path):
    out = vtp(
        "config",
        "--region",
        "cn",
        data_dir=tmp_path,
        VTP_WAREHOUSE="http://vtp:hunter2@ch.example:8123/vtp_{region}",
        VTP_KAFKA_EXTRA='{"sasl.password": "hunter3", "security.protocol": "SASL_SSL"}',
    )
    assert out.returncode == 0, out.stderr
    assert "VTP_REGION=cn  (text, default (empty); the region this process serves" in out.stdout
    assert "VTP_WAREHOUSE=http://vtp:***@ch.example:8123/vtp_{region}" in out.stdout
    assert "SASL_SSL" in out.stdout and "hunter" not in out.stdout


def test_token_keys_and_serve_refuse_what_they_cannot_do_in_one_line(tmp_path):
    import socket

    from owner_api.tokens import verify
    from vtp.core.keys import load_keyring
    from vtp.core.settings import Settings

    token = vtp("token", "owner-0001", "--region", "eu", "--ttl", "60", data_dir=tmp_path)
    assert token.returncode == 0, token.stderr
    eu = Settings(data_dir=tmp_path, region="eu")
    claims = verify(load_keyring(eu, create=False), token.stdout.strip(), "eu")  # the service's key
    assert (claims.owner_id, claims.region, claims.is_owner) == ("owner-0001", "eu", True)
    listed = vtp("keys", "list", "--region", "eu", data_dir=tmp_path)
    assert listed.returncode == 0 and listed.stdout.count("owner-") >= 2
    secret = next((eu.keys_path / "owner").glob("*.key")).read_text().strip()
    assert secret not in listed.stdout + token.stdout
    pseudonym = (eu.keys_path / "pseudonym.key").read_text().strip()  # one process makes all
    assert "pseudonym key: present" in listed.stdout and pseudonym not in listed.stdout
    rotated = vtp("keys", "rotate", "--kind", "owner", "--region", "eu", data_dir=tmp_path)
    assert rotated.returncode == 0 and "signs from now on" in rotated.stdout
    assert (
        verify(load_keyring(eu, create=False), token.stdout.strip(), "eu").owner_id == "owner-0001"
    )

    wrong = vtp("token", "owner-0001", "--region", "us", data_dir=tmp_path)
    assert wrong.returncode == 2 and "region 'us' is not one of" in wrong.stderr
    assert vtp("serve", "--region", "us", data_dir=tmp_path).returncode == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = vtp("serve", "--region", "eu", data_dir=tmp_path, VTP_API_PORT=str(port))
    assert busy.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "Traceback" not in busy.stderr


def test_a_worker_that_must_restart_exits_for_its_supervisor_at_once(tmp_path):
    # What the stall watchdog and the gap check call: no finally block, no commit.
    code = (
        "import atexit\n"
        "atexit.register(print, 'atexit ran')\n"
        "from stream_jobs.faust_fixes import exit_for_restart\n"
        "try:\n    exit_for_restart()\nfinally:\n    print('finally ran')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_RESTART == 75, done.stderr
    assert "ran" not in done.stdout


def test_vtp_sql_runs_allowed_queries_and_refuses_the_rest_in_one_line(tmp_path):
    ok = vtp("sql", "SELECT count() AS n FROM analyst_samples", "--region", "eu", data_dir=tmp_path)
    assert ok.returncode == 0 and ok.stdout.splitlines() == ["n", "0"], ok.stderr
    for sql, why in [
        ("SELECT file('/proc/self/environ')", "function file is not open to analysts"),
        ("SELECT * FROM samples", "table 'samples' is not open to analysts"),
        ("SELECT 1; DROP TABLE samples", "Multi-statements are not allowed"),
    ]:
        refused = vtp("sql", sql, "--region", "eu", data_dir=tmp_path)
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


def test_a_region_refuses_a_cluster_that_holds_another_regions_topics(base_settings, region_stack):
    eu = region_stack("eu", "guard")
    for args in (("simulate", "--minutes", "1"), ("topics",), ("sink",), ("worker",)):
        refused = vtp(
            *args,
            "--region",
            "cn",
            data_dir=eu.data_dir,
            VTP_KAFKA_BOOTSTRAP=eu.bootstrap(),
            VTP_TOPIC_PREFIX=eu.topic_prefix,
        )
        assert refused.returncode == 1, (args, refused.stderr)
        assert "holds another region's topics" in refused.stderr, (args, refused.stderr)
    from confluent_kafka.admin import AdminClient

    topics = AdminClient({"bootstrap.servers": eu.bootstrap()}).list_topics(timeout=10).topics
    assert not [t for t in topics if t.startswith(f"{eu.topic_prefix}.cn.")]

"""Prometheus and Alertmanager artefacts, checked by the tools operators run them with:
promtool (config, rules, the rules' unit tests) and amtool, from Debian's packages
(``deploy.tools``, fetched once by ``make tools``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.tools import tool

pytestmark = pytest.mark.deploy

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "vtp.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "vtp.test.yml"


def _run(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool(name)), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_the_prometheus_config_and_its_rules_load():
    done = _run("promtool", "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


def test_the_rules_check_and_their_unit_tests_pass():
    checked = _run("promtool", "check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run("promtool", "test", "rules", RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_that_sees_it_fire():
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    fired = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == fired


def test_a_changed_threshold_fails_the_unit_tests(tmp_path):
    """The tests pin the rules: one threshold moved makes them fail."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    moved = RULES.read_text().replace(
        "vtp_erasure_oldest_pending_seconds) > 3600", "vtp_erasure_oldest_pending_seconds) > 7200"
    )
    assert moved != RULES.read_text()
    (tmp_path / "rules" / "vtp.yml").write_text(moved)
    shutil.copy(RULE_TESTS, tmp_path / "tests" / "vtp.test.yml")
    done = _run("promtool", "test", "rules", tmp_path / "tests" / "vtp.test.yml")
    assert done.returncode != 0
    assert "VtpErasureOverdue" in done.stdout + done.stderr


def test_a_broken_rule_is_refused(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(
        RULES.read_text().replace("sum by (region) (rate(", "sum by (region (rate(", 1)
    )
    done = _run("promtool", "check", "rules", broken)
    assert done.returncode != 0


def test_the_alertmanager_config_loads():
    done = _run("amtool", "check-config", DEPLOY / "alertmanager" / "alertmanager.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 receivers" in done.stdout


def test_promtool_refuses_an_exposition_with_a_misnamed_counter():
    """What the end-to-end test asks of every process's /metrics is a real check."""
    done = subprocess.run(
        [str(tool("promtool")), "check", "metrics"],
        input="# HELP vtp_things Things\n# TYPE vtp_things counter\nvtp_things 1\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and '"_total" suffix' in done.stdout + done.stderr

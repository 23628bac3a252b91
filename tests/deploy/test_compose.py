"""One region's Compose stack (deploy/compose), checked by the compose-spec schema
(check-jsonschema's vendored copy) and the compose-go loader behind `docker compose
config` (vtp's compose-check, built by deploy.gotools); its Prometheus config by
promtool; its VTP_* variables by vtp's own settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.tools import tool
from vtp.core.regions import REGIONS
from vtp.core.settings import documented_settings, load_settings

pytestmark = pytest.mark.deploy

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
FILLED = {"VTP_IMAGE": "vtp:0.4.0", "CLICKHOUSE_PASSWORD": "not-a-real-one"}
VTP_SERVICES = ("topics", "keys", "worker", "sink", "serve", "gateway")


def _compose_check(compose: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "CLICKHOUSE_"))}
    return subprocess.run(
        [str(tool("compose-check")), "-json", "-strict-env", str(compose)],
        env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _project(region: str) -> dict[str, Any]:
    done = _compose_check(COMPOSE, VTP_REGION=region, **FILLED)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_stack_matches_the_compose_spec_schema():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("region", REGIONS)
def test_the_stack_loads_as_docker_compose_would_for_each_region(region):
    project = _project(region)
    assert project["name"] == f"vtp-{region}"
    infrastructure = {"kafka", "clickhouse", "prometheus", "alertmanager"}
    assert set(VTP_SERVICES) | infrastructure == set(project["services"])


@pytest.mark.parametrize(
    ("env", "change", "refusal"),
    [
        ({}, None, "set VTP_REGION to cn or eu"),
        ({"VTP_REGION": "eu", "VTP_IMAGE": "vtp:0.4.0"}, None, "set CLICKHOUSE_PASSWORD"),
        (
            {"VTP_REGION": "eu", **FILLED},
            ("topics: {condition", "topic: {condition"),
            'depends on undefined service "topic"',
        ),
        (
            {"VTP_REGION": "eu", **FILLED},
            ("  - keys:/var/lib/vtp-keys:ro", "  - key:/var/lib/vtp-keys:ro"),
            "undefined volume key",
        ),
        (
            {"VTP_REGION": "eu", **FILLED},
            ("networks:\n  backend", "netwroks:\n  backend"),
            "'netwroks' not allowed",
        ),
    ],
)
def test_a_broken_stack_is_refused_with_what_is_wrong(tmp_path, env, change, refusal):
    compose = tmp_path / "compose" / "compose.yaml"
    shutil.copytree(COMPOSE.parent, compose.parent)
    if change:
        text = compose.read_text()
        assert change[0] in text
        compose.write_text(text.replace(change[0], change[1], 1))
    done = _compose_check(compose, **env)
    assert done.returncode != 0 and refusal in done.stderr, done.stderr


def test_prometheus_of_the_stack_loads_vtps_rules_and_labels_the_region(tmp_path):
    content = _project("cn")["configs"]["prometheus"]["content"]
    (tmp_path / "prometheus.yml").write_text(content)
    shutil.copytree(DEPLOY / "prometheus" / "rules", tmp_path / "rules")
    done = subprocess.run(
        [str(tool("promtool")), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "SUCCESS: 1 rule files found" in done.stdout, (
        done.stdout + done.stderr
    )
    assert content.count("labels: {region: cn}") == 4
    assert 'targets: ["alertmanager:9093"]' in content  # the rules fire somewhere


@pytest.mark.parametrize("region", REGIONS)
def test_every_vtp_variable_is_a_setting_vtp_accepts_and_nothing_listens_beyond_loopback(region):
    known = {d.variable for d in documented_settings()}
    services = _project(region)["services"]
    for name in VTP_SERVICES:
        env = services[name]["environment"]
        assert set(env) <= known, name
        assert load_settings(env).region == region  # raises on a value vtp refuses
        assert services[name]["read_only"] is True and services[name]["user"] == "10001:10001"
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", name
    worker = services["worker"]["environment"]
    assert (
        "VTP_WAREHOUSE" not in worker and "VTP_KEYS_DIR" in worker
    )  # the worker holds no warehouse URL


@pytest.mark.parametrize("region", REGIONS)
def test_the_gateway_reads_its_pki_folder_read_only_and_is_scraped(region):
    project = _project(region)
    gateway = project["services"]["gateway"]
    settings = load_settings(gateway["environment"])
    assert settings.gateway_host == "0.0.0.0" and gateway["command"] == ["gateway"]
    pki = [v for v in gateway["volumes"] if v["target"] == settings.pki_dir]
    assert len(pki) == 1 and pki[0]["type"] == "bind" and pki[0]["read_only"] is True
    assert [(p["target"], p["host_ip"]) for p in gateway["ports"]] == [
        (settings.gateway_port, "127.0.0.1")
    ]
    scrape = project["configs"]["prometheus"]["content"]
    assert f'targets: ["gateway:{settings.metrics_port}"]' in scrape

"""Grafana's dashboards and datasource provisioning (deploy/grafana): the dashboards
decode strictly into the Grafana foundation SDK's model (vtp's dashboard-check, built by
deploy.gotools); every PromQL expression parses and names a metric vtp exports; every
warehouse query passes the analyst allow-list and runs on the real engine over vtp's
schema; the provisioning file passes the schema written for it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from deploy.tools import tool
from owner_api.analyst import AnalystLimits, run_analyst_query
from sinks.migrations import migrate
from sinks.pseudonyms import record_pairs
from vtp.core import metrics
from vtp.core.keys import pseudonym_key
from vtp.core.settings import Settings
from vtp.core.warehouse import ChdbWarehouse

pytestmark = pytest.mark.deploy

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
PROVISIONING = GRAFANA / "provisioning"


def _targets(datasource_type: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if target["datasource"]["type"] == datasource_type:
                    found.append((f"{path.stem}: {panel['title']}", target))
    return found


def _dashboard_check(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool("dashboard-check")), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_dashboards_decode_strictly_into_grafanas_model():
    assert [p.stem for p in DASHBOARDS] == ["vtp-fleet", "vtp-pipeline"]
    done = _dashboard_check(*DASHBOARDS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "note" not in done.stderr  # every panel type and query type was checked


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (('"gridPos"', '"gridpos"'), "unexpected field 'gridpos'"),
        (('"showLegend": true', '"showLegend": "yes"'), "showLegend"),
        (('"rawSql"', '"rawSQL"'), "unexpected field 'rawSQL'"),
    ],
)
def test_a_broken_dashboard_is_refused(tmp_path, change, refusal):
    source = (
        GRAFANA
        / "dashboards"
        / ("vtp-fleet.json" if "rawSql" in change[0] else "vtp-pipeline.json")
    )
    broken = tmp_path / source.name
    broken.write_text(source.read_text().replace(*change, 1))
    done = _dashboard_check(broken)
    assert done.returncode == 1 and refusal in done.stderr, done.stderr


def _exported_series() -> set[str]:
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names = {"up", "process_start_time_seconds"}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            names |= {metric._name + s for s in suffixes[metric._type]}
    return names


def test_every_promql_expression_parses_and_names_a_series_vtp_exports(tmp_path):
    targets = _targets("prometheus")
    assert len(targets) >= 10
    exported = _exported_series()
    rules = []
    for i, (where, target) in enumerate(targets):
        expr = target["expr"].replace("$region", ".*").replace("$__rate_interval", "5m")
        named = set(re.findall(r"\b((?:vtp|process)_[a-z_]+)\b", expr)) - {"vtp_"}
        assert named and named <= exported, f"{where}: {named - exported}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    file = tmp_path / "dashboard-exprs.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = subprocess.run(
        [str(tool("promtool")), "check", "rules", str(file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _expanded(sql: str) -> str:
    """The ClickHouse datasource's macros, as Grafana would expand them for 30 days."""
    return re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= now() - INTERVAL 30 DAY AND \1 <= now()", sql)


def test_every_warehouse_query_passes_the_analyst_allow_list_and_runs(tmp_path):
    settings = Settings(data_dir=tmp_path, region="eu")
    warehouse = ChdbWarehouse(settings.warehouse_path)
    try:
        migrate(warehouse)
        warehouse.execute(
            "INSERT INTO samples (owner_id, vin, event_time, seq, upload_id, speed, region, "
            "schema_version, received_at) VALUES ('owner-A', 'VINAAAAAAAAAAAAA1', now64(3) - 60, 1, "
            "'u1', 50, 'eu', 1, now64(3))"
        )
        record_pairs(warehouse, pseudonym_key(settings), {("owner-A", "VINAAAAAAAAAAAAA1")})
        targets = _targets("grafana-clickhouse-datasource")
        assert len(targets) >= 5
        for where, target in targets:
            result = run_analyst_query(warehouse, _expanded(target["rawSql"]), AnalystLimits())
            if target["format"] == 0:  # a time series: its time column first
                assert result.column_names[0] == "time", where
        reporting = next(t for w, t in targets if "Vehicles reporting" in w)
        assert (
            run_analyst_query(warehouse, _expanded(reporting["rawSql"]), AnalystLimits()).num_rows
            == 1
        )
    finally:
        warehouse.close()


def _schema_check(document: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--schemafile", str(PROVISIONING / "datasources.schema.json"), str(document),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_datasource_provisioning_passes_its_schema():
    done = _schema_check(PROVISIONING / "datasources" / "vtp.yaml")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (("${VTP_GRAFANA_CLICKHOUSE_PASSWORD}", "hunter2"), "password"),  # a secret in the file
        (("secure: true", "secure: false"), "secure"),
        (("username: vtp_grafana", "username: vtp"), "username"),  # the writer's account
        (("vtp_${VTP_REGION}", "vtp_us"), "defaultDatabase"),
        (
            (
                "    editable: false\n    jsonData:\n      host",
                "    editable: false\n    jsonData:\n      hots",
            ),
            "hots",
        ),
    ],
)
def test_the_provisioning_schema_refuses_what_it_does_not_allow(tmp_path, change, refusal):
    text = (PROVISIONING / "datasources" / "vtp.yaml").read_text()
    assert change[0] in text
    broken = tmp_path / "vtp.yaml"
    broken.write_text(text.replace(*change, 1))
    done = _schema_check(broken)
    assert done.returncode == 1 and refusal in done.stdout, done.stdout

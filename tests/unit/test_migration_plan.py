"""`vtp migrations --plan`: the SQL a cluster would run, for an operator to read or feed to
clickhouse-client; nothing connects."""

from __future__ import annotations

import pytest

from sinks.migrations import plan, statements
from vtp.cli import main

SERVER = {
    "VTP_WAREHOUSE": "http://u:p@ch:8123/vtp_{region}",
    "VTP_WAREHOUSE_CLUSTER": "vtp_eu",
    "VTP_REGION": "eu",
}


@pytest.fixture
def environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VTP_DATA_DIR", str(tmp_path))
    for name, value in SERVER.items():
        monkeypatch.setenv(name, value)


def test_the_plan_prints_every_statement_for_the_configured_cluster(environment, capsys):
    assert main(["migrations", "--plan"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("-- vtp's migrations for cluster vtp_eu, database vtp_eu")
    expected = plan("vtp_eu", database="vtp_eu")
    assert statements(printed) == [s for _, _, out in expected for s in out]
    assert "-- 0008_upload_stored_at" in printed


def test_the_plan_for_one_server_is_the_migration_files(environment, monkeypatch, capsys):
    monkeypatch.delenv("VTP_WAREHOUSE_CLUSTER")
    assert main(["migrations", "--plan"]) == 0
    assert statements(capsys.readouterr().out) == [s for _, _, out in plan("") for s in out]


def test_a_bad_cluster_name_is_refused_clearly(environment, capsys):
    assert main(["migrations", "--plan", "--cluster", "eu-1"]) == 2
    assert "not a ClickHouse identifier" in capsys.readouterr().err

"""deploy/clickhouse-analyst-role.sql, for a ClickHouse server (none runs here): every
statement parses in the real engine, and the limits it puts on analysts who reach the
views directly are the ones vtp puts on every analyst query."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from owner_api.analyst import AnalystLimits
from sinks.migrations import statements
from vtp.core.settings import Settings
from vtp.core.warehouse import ChdbWarehouse, rows

pytestmark = pytest.mark.deploy

ROLE_SQL = Path(__file__).resolve().parents[2] / "deploy" / "clickhouse-analyst-role.sql"


def test_every_statement_parses_in_the_engine(tmp_path):
    warehouse = ChdbWarehouse(Settings(data_dir=tmp_path, region="eu").warehouse_path)
    try:
        for statement in statements(ROLE_SQL.read_text()):
            formatted = rows(
                warehouse.query("SELECT formatQuerySingleLine({q:String})", {"q": statement})
            )[0][0]
            assert formatted.split()[0] in ("CREATE", "ALTER", "GRANT"), formatted
    finally:
        warehouse.close()


def test_the_profile_holds_the_analyst_limits_and_none_can_be_changed():
    (profile,) = [s for s in statements(ROLE_SQL.read_text()) if "SETTINGS PROFILE" in s]
    found = dict(re.findall(r"(\w+) = '?(\w+)'? CONST", profile))
    limits = AnalystLimits()
    # readonly 2: Grafana's plugin sets harmless settings per query; the limits stay CONST.
    wanted = {**limits.engine_settings(), "readonly": "2"}
    assert found == {**wanted, "max_result_bytes": str(limits.max_result_bytes)}
    assert profile.rstrip().endswith("TO vtp_analyst")

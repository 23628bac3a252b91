"""`vtp sql`: an analyst query against the region's warehouse, run here when the warehouse
is free, or through `vtp serve` (with a short-lived analyst token) when that service owns
the embedded engine. The same guard and limits apply either way (owner_api.analyst)."""

from __future__ import annotations

import json

import httpx

from owner_api.analyst import AnalystLimits, AnalystQueryError, result_rows, run_analyst_query
from owner_api.tokens import analyst_claims, issue
from sinks.migrations import MigrationOptions, migrate
from vtp.core.keys import load_keyring
from vtp.core.settings import Settings
from vtp.core.warehouse import WarehouseBusy, open_warehouse
from vtp.serve import address_file


def query_locally_or_via_service(
    settings: Settings, sql: str
) -> tuple[list[str], list[list[object]]]:
    """`vtp sql`: open the region's warehouse, or, when `vtp serve` owns it (embedded
    mode), send the query to that service with a short-lived analyst token."""
    try:
        warehouse = open_warehouse(settings)
    except WarehouseBusy:
        return _via_service(settings, sql)
    try:
        migrate(warehouse, options=MigrationOptions.from_settings(settings))
        result = run_analyst_query(warehouse, sql, AnalystLimits.from_settings(settings))
        return result.column_names, result_rows(result)
    finally:
        warehouse.close()


def _via_service(settings: Settings, sql: str) -> tuple[list[str], list[list[object]]]:
    path = address_file(settings)
    if not path.exists():
        raise AnalystQueryError(
            f"the {settings.region} warehouse is open in another process that is not "
            "`vtp serve`; stop that process (a `vtp sink`?) or run the query through `vtp serve`"
        )
    url = json.loads(path.read_text())["url"]
    token = issue(load_keyring(settings), analyst_claims("vtp-sql", settings.region, 300))
    response = httpx.post(
        f"{url}/v1/analyst/sql",
        json={"sql": sql},
        headers={"Authorization": f"Bearer {token}"},
        timeout=300,
    )
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        raise AnalystQueryError(
            body.get("message", f"{response.status_code}: {response.text[:200]}"),
            body.get("error", "query_failed"),
        )
    return body["columns"], body["rows"]

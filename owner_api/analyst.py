"""Analyst queries: only the pseudonymised analyst_* views, read-only.

On a ClickHouse server the role in deploy/clickhouse-analyst-role.sql enforces this.
The embedded engine has no users, so `vtp sql` checks each query's syntax tree, as
ClickHouse itself parses it (EXPLAIN AST), before running it: one SELECT, every table
it reads an analyst_* view, no table functions (file, url, remote, ...), no functions
that read tables or dictionaries (joinGet, dictGet...). Subqueries are checked the same
way; a WITH name used as a table is refused (write the subquery in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from sinks.warehouse import Warehouse, WarehouseBusy, WarehouseError, open_warehouse, rows
from vtp.settings import Settings

ANALYST_PREFIX = "analyst_"
IN_FUNCTIONS = {"in", "notIn", "globalIn", "globalNotIn", "nullIn", "notNullIn", "globalNullIn"}
TABLE_READING_PREFIXES = ("dictGet", "dictHas", "dictIsIn", "joinGet", "getSetting")
MAX_ROWS = 100_000


class AnalystQueryError(ValueError):
    """The query is not allowed for analysts, or does not parse."""


@dataclass
class _Node:
    label: str
    children: list[_Node] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.label.split(" ", 1)[0]

    @property
    def name(self) -> str:
        parts = self.label.split(" ")
        return parts[1] if len(parts) > 1 and not parts[1].startswith("(") else ""


def parse_ast(lines: list[str]) -> _Node:
    """EXPLAIN AST output (one node per line, indented by depth) as a tree."""
    root = _Node("<root>")
    stack: list[tuple[int, _Node]] = [(-1, root)]
    for line in lines:
        depth = len(line) - len(line.lstrip(" "))
        node = _Node(line.strip())
        while stack[-1][0] >= depth:
            stack.pop()
        stack[-1][1].children.append(node)
        stack.append((depth, node))
    return root


def _table_name(identifier: str) -> str:
    return identifier.split(".")[-1].strip("`")


def check_ast(root: _Node) -> None:
    """Raise AnalystQueryError unless the tree reads only analyst_* views."""
    if len(root.children) != 1 or root.children[0].kind != "SelectWithUnionQuery":
        raise AnalystQueryError("only a single SELECT query is allowed")

    def visit(node: _Node) -> None:
        if node.kind == "TableExpression":
            source = node.children[0] if node.children else None
            if source is None or source.kind not in ("TableIdentifier", "Subquery"):
                what = f"{source.kind} {source.name}".strip() if source else "nothing"
                raise AnalystQueryError(f"reading from {what} is not allowed; use analyst_* views")
            if source.kind == "TableIdentifier":
                _allowed_table(source.name)
        if node.kind == "Function":
            if node.name.startswith(TABLE_READING_PREFIXES):
                raise AnalystQueryError(f"function {node.name} is not allowed for analysts")
            if node.name in IN_FUNCTIONS:
                args = node.children[0].children if node.children else []
                if len(args) == 2 and args[1].kind == "Identifier":
                    _allowed_table(args[1].name)  # `x IN table` reads that table
        for child in node.children:
            visit(child)

    visit(root)


def _allowed_table(identifier: str) -> None:
    database = identifier.split(".")[0] if "." in identifier else None
    if database not in (None, "default") or not _table_name(identifier).startswith(ANALYST_PREFIX):
        raise AnalystQueryError(
            f"table {identifier} is not open to analysts; query the analyst_* views "
            "(analyst_samples, analyst_trips, analyst_charges, analyst_daily_summaries)"
        )


def run_analyst_query(warehouse: Warehouse, sql: str, max_rows: int = MAX_ROWS) -> pa.Table:
    text = sql.strip().rstrip(";").strip()
    if not text:
        raise AnalystQueryError("the query is empty")
    if ";" in text:
        # The embedded engine runs every statement of a multi-statement text, even
        # after EXPLAIN; nothing with a second statement may reach it.
        raise AnalystQueryError("one statement only: the query may not contain ';'")
    try:
        ast = rows(warehouse.query(f"EXPLAIN AST {text}"))
    except WarehouseError as exc:
        raise AnalystQueryError(f"the query does not parse: {str(exc).splitlines()[0]}") from None
    check_ast(parse_ast([line for (line,) in ast]))
    try:
        return warehouse.query(f"SELECT * FROM ({text}) LIMIT {int(max_rows)}")
    except WarehouseError as exc:
        raise AnalystQueryError(str(exc).split("\n-- while running")[0]) from None


def query_locally_or_via_service(
    settings: Settings, region: str, sql: str
) -> tuple[list[str], list[list]]:
    """`vtp sql`: open the region's warehouse, or, when `vtp serve` owns it (embedded
    mode), send the query to that service with a short-lived analyst token."""
    try:
        warehouse = open_warehouse(settings, region)
    except WarehouseBusy:
        return _via_service(settings, region, sql)
    try:
        from sinks.migrations import migrate

        migrate(warehouse)
        result = run_analyst_query(warehouse, sql)
        return result.column_names, [list(r.values()) for r in result.to_pylist()]
    finally:
        warehouse.close()


def _via_service(settings: Settings, region: str, sql: str) -> tuple[list[str], list[list]]:
    import json

    import httpx

    from owner_api.serve import address_file
    from owner_api.tokens import issue_analyst, signing_key

    path = address_file(settings, region)
    if not path.exists():
        raise AnalystQueryError(
            f"the {region} warehouse is open in another process that is not `vtp serve`; "
            "stop that process (a `vtp sink`?) or run the query through `vtp serve`"
        )
    url = json.loads(path.read_text())["url"]
    token = issue_analyst(signing_key(settings), "vtp-sql", region, 300)
    response = httpx.post(
        f"{url}/v1/analyst/sql", json={"sql": sql},
        headers={"Authorization": f"Bearer {token}"}, timeout=300,
    )  # fmt: skip
    body = response.json()
    if response.status_code != 200:
        raise AnalystQueryError(body.get("message", response.text))
    return body["columns"], body["rows"]

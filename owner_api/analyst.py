"""Analyst queries: one SELECT over the pseudonymised analyst_* views, nothing else.

Everything here is an allow-list, because the embedded engine enforces almost nothing
by itself (it runs inside this process: its file() reads any file the process can, and
readonly=1 lets file() and INTO OUTFILE through):

1. ``formatQuerySingleLine`` parses the text without running it and refuses a second
   statement; the canonical text it returns is what runs.
2. ``EXPLAIN AST`` of that text is read as a tree whose shape (indentation, children
   counts) must be exact, so an identifier cannot smuggle in a fake node. Only the node
   kinds of plain SELECTs are allowed (no SETTINGS, FORMAT or INTO OUTFILE), only the
   functions in FUNCTIONS (no file, url, dictionaries, settings or system access), no
   table functions, and every table is an analyst_* view.
3. The query runs on a connection of its own, opened read-only with its limits in the
   connection (execution time, memory, rows read), which no statement can change; a
   runaway query is cancelled there while the sink and owner requests go on over the
   main connection. The result is cut at the row limit by the engine (LIMIT around the
   checked text: chdb's Arrow output ignores max_result_rows) and refused above its size
   limit before Python turns it into rows. On a ClickHouse server the same limits go with
   the query, and deploy/clickhouse-analyst-role.sql adds a role with SELECT on the views.

The views name owners and vehicles only by keyed pseudonyms, which the sink computes
with a key kept in the keys folder (vtp.core.keys), never in the warehouse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

from owner_api.store import jsonable
from vtp.core.settings import Settings
from vtp.core.warehouse import Warehouse, WarehouseError, rows

ANALYST_VIEWS = ("analyst_samples", "analyst_trips", "analyst_charges", "analyst_daily_summaries")

NODE_KINDS = frozenset(
    {
        "SelectWithUnionQuery",
        "SelectIntersectExceptQuery",
        "SelectQuery",
        "ExpressionList",
        "Identifier",
        "Literal",
        "Function",
        "Asterisk",
        "QualifiedAsterisk",
        "ColumnsRegexpMatcher",
        "ColumnsTransformerList",
        "ColumnsExceptTransformer",
        "TablesInSelectQuery",
        "TablesInSelectQueryElement",
        "TableExpression",
        "TableIdentifier",
        "TableJoin",
        "ArrayJoin",
        "Subquery",
        "WithElement",
        "OrderByElement",
        "WindowDefinition",
        "WindowListElement",
    }
)

# Functions analysts may call, by lower-case name (as parsed: operators are functions).
# A function not listed is closed until someone opens it here, on purpose.
FUNCTIONS = frozenset(
    """
    plus minus multiply divide intdiv intdivorzero modulo negate abs
    equals notequals less greater lessorequals greaterorequals and or not xor
    in notin like notlike ilike notilike
    if multiif casewithexpression isnull isnotnull coalesce ifnull nullif assumenotnull
    round floor ceil ceiling trunc sqrt cbrt exp log ln log2 log10 pow power sign
    greatest least sin cos tan asin acos atan atan2 pi e
    count sum avg min max any anylast argmin argmax uniq uniqexact uniqcombined
    countdistinct median quantile quantiles quantileexact quantiletdigest
    stddevpop stddevsamp varpop varsamp corr covarpop covarsamp grouparray groupuniqarray
    topk sumwithoverflow
    row_number rank dense_rank laginframe leadinframe first_value last_value
    todate todate32 todatetime todatetime64 tostartofday tostartofhour tostartofminute
    tostartoffifteenminutes tostartofweek tostartofmonth tostartofquarter tostartofyear
    tostartofinterval tomonday toyyyymm toyyyymmdd toyear toquarter tomonth todayofmonth
    todayofweek todayofyear tohour tominute tosecond toisoweek toweek totimezone
    tounixtimestamp tounixtimestamp64milli fromunixtimestamp64milli datediff date_diff
    dateadd datesub adddays addhours addminutes addseconds addweeks addmonths
    subtractdays subtracthours subtractminutes subtractseconds subtractweeks subtractmonths
    tointervalsecond tointervalminute tointervalhour tointervalday tointervalweek
    tointervalmonth tointervalyear now today yesterday formatdatetime
    length lower upper concat substring startswith endswith position trim trimleft
    trimright replaceall replaceone tostring leftpad rightpad empty notempty
    tofloat32 tofloat64 toint32 toint64 touint32 touint64 todecimal64 cast _cast
    tofloat64ornull toint64ornull
    array tuple tupleelement arrayelement has hasany hasall arraymap arrayfilter
    arraysum arraycount arrayjoin arraysort arraydistinct arrayuniq range lambda
    exists greatcircledistance geodistance
    """.split()
)
COMBINATORS = ("if", "distinct", "ornull", "ordefault")
IN_FUNCTIONS = frozenset({"in", "notin", "globalin", "globalnotin", "nullin", "notnullin"})
MAX_DEPTH = 200  # a deeper tree is refused before anything walks it
NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_LINE = re.compile(r"^(?P<indent> *)(?P<kind>[A-Za-z]+)(?P<rest>.*?)(?: \(children (?P<n>\d+)\))?$")
_ALIAS = re.compile(rf" \(alias ({NAME})\)$")


class AnalystQueryError(ValueError):
    """The query is refused (``code`` query_refused) or failed or was cancelled in the
    engine (query_failed, query_cancelled: a limit was reached)."""

    def __init__(self, message: str, code: str = "query_refused"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AnalystLimits:
    max_execution_s: float = 10.0
    max_memory_bytes: int = 1024 * 2**20
    max_rows_read: int = 200_000_000
    max_result_rows: int = 100_000
    max_result_bytes: int = 64 * 2**20

    @classmethod
    def from_settings(cls, settings: Settings) -> AnalystLimits:
        return cls(
            settings.analyst_max_execution_s,
            settings.analyst_max_memory_mb * 2**20,
            settings.analyst_max_rows_read,
            settings.analyst_max_result_rows,
            settings.analyst_max_result_mb * 2**20,
        )

    def engine_settings(self) -> dict[str, str]:
        """Fixed on the analyst's connection: readonly=1 also forbids changing any of them."""
        return {
            "readonly": "1",
            "max_execution_time": f"{self.max_execution_s:g}",
            "timeout_overflow_mode": "throw",
            "max_memory_usage": str(self.max_memory_bytes),
            "max_rows_to_read": str(self.max_rows_read),
            "read_overflow_mode": "throw",
            "max_result_rows": str(self.max_result_rows),
            "result_overflow_mode": "throw",
            "allow_introspection_functions": "0",
        }


@dataclass
class _Node:
    kind: str
    name: str  # what follows the kind on its line (a function's or table's name, a literal)
    declared: int
    children: list[_Node] = field(default_factory=list)


def parse_ast(lines: list[str]) -> _Node:
    """EXPLAIN AST output as a tree; refuses any line or shape that is not exact."""
    root = _Node("<root>", "", 1)
    stack: list[tuple[int, _Node]] = [(-1, root)]
    for line in lines:
        match = _LINE.match(line)
        if match is None:
            raise AnalystQueryError(f"unexpected syntax tree line {line[:80]!r}")
        depth = len(match["indent"])
        if depth > MAX_DEPTH:
            raise AnalystQueryError(f"the query nests deeper than {MAX_DEPTH} levels")
        node = _Node(match["kind"], match["rest"].strip(), int(match["n"] or 0))
        while stack[-1][0] >= depth:
            stack.pop()
        if depth != stack[-1][0] + 1:
            raise AnalystQueryError("unexpected syntax tree shape")
        stack[-1][1].children.append(node)
        stack.append((depth, node))
    _check_counts(root)
    return root


def _check_counts(node: _Node) -> None:
    if len(node.children) != node.declared:
        raise AnalystQueryError("unexpected syntax tree shape")
    for child in node.children:
        _check_counts(child)


def _function_allowed(name: str) -> bool:
    lower = name.lower()
    if lower in FUNCTIONS:
        return True
    return any(lower.endswith(c) and lower[: -len(c)] in FUNCTIONS for c in COMBINATORS)


def _view(name: str) -> None:
    if name not in ANALYST_VIEWS:
        raise AnalystQueryError(
            f"table {name!r} is not open to analysts; query {', '.join(ANALYST_VIEWS)}"
        )


def check_ast(root: _Node) -> None:
    """Raise AnalystQueryError unless the tree is one plain SELECT over analyst views."""
    if len(root.children) != 1 or root.children[0].kind != "SelectWithUnionQuery":
        raise AnalystQueryError("only a single SELECT query is allowed")
    if len(root.children[0].children) != 1:
        raise AnalystQueryError("FORMAT, INTO OUTFILE and SETTINGS are not allowed")

    def visit(node: _Node, parent: _Node) -> None:
        if node.kind not in NODE_KINDS:
            raise AnalystQueryError(f"{node.kind} is not allowed in an analyst query")
        alias = _ALIAS.search(node.name)
        name = node.name[: alias.start()] if alias else node.name
        if node.kind == "Function":
            if parent.kind == "TableExpression":
                raise AnalystQueryError(f"table function {name} is not allowed")
            if not re.fullmatch(NAME, name) or not _function_allowed(name):
                raise AnalystQueryError(f"function {name} is not open to analysts")
            if name.lower() in IN_FUNCTIONS and node.children and node.children[0].children:
                table = node.children[0].children[-1]
                if table.kind == "Identifier":
                    _view(table.name)  # `x IN table` reads that table
        elif node.kind == "Identifier" and not re.fullmatch(rf"{NAME}(\.{NAME})*", name):
            raise AnalystQueryError(f"identifier {name!r} is not allowed")
        elif node.kind == "TableIdentifier":
            _view(name)
        for child in node.children:
            visit(child, node)

    visit(root.children[0], root)


def run_analyst_query(warehouse: Warehouse, sql: str, limits: AnalystLimits) -> pa.Table:
    text = sql.strip()
    if not text:
        raise AnalystQueryError("the query is empty")
    settings = limits.engine_settings()
    try:
        # Parsed, never run; a second statement is refused here.
        canonical = rows(
            warehouse.analyst_query(
                "SELECT formatQuerySingleLine({q:String})", {"q": text}, settings
            )
        )[0][0]
        ast = warehouse.analyst_lines(f"EXPLAIN AST {canonical}", None, settings)
    except WarehouseError as exc:
        raise AnalystQueryError(f"the query does not parse: {_first_line(exc)}") from None
    check_ast(parse_ast(ast))
    # The canonical text is one formatted SELECT (no comments, balanced), so it can be
    # wrapped: the engine stops at the row limit instead of handing over everything.
    bounded = f"SELECT * FROM ({canonical}) LIMIT {limits.max_result_rows + 1}"
    try:
        result = warehouse.analyst_query(bounded, None, settings)
    except WarehouseError as exc:
        message = _first_line(exc)
        limited = any(f"Code: {c}." in message for c in (158, 159, 160, 241, 307, 396))
        raise AnalystQueryError(message, "query_cancelled" if limited else "query_failed") from None
    if result.num_rows > limits.max_result_rows:
        raise AnalystQueryError(
            f"the result has more than {limits.max_result_rows} rows (LIMIT): aggregate, or "
            "add a LIMIT",
            "query_cancelled",
        )
    if result.nbytes > limits.max_result_bytes:
        raise AnalystQueryError(
            f"the result is larger than {limits.max_result_bytes // 2**20} MiB (LIMIT): "
            "select fewer or smaller columns",
            "query_cancelled",
        )
    return result


def result_rows(table: pa.Table) -> list[list[object]]:
    """The rows of a result as JSON-ready lists; text that is not UTF-8 (the engine's
    strings are bytes) comes out with replacement characters instead of failing."""
    try:
        columns = [c.to_pylist() for c in table.columns]
    except (UnicodeDecodeError, pa.ArrowInvalid):
        columns = [_decoded(c.cast(_as_binary(c.type)).to_pylist()) for c in table.columns]
    return [[_jsonable(v) for v in row] for row in zip(*columns, strict=True)]


def _as_binary(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pa.binary()
    if pa.types.is_list(kind):
        return pa.list_(_as_binary(kind.value_type))
    return kind


def _decoded(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def _jsonable(value: object) -> object:
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return jsonable(value)


def _first_line(exc: Exception) -> str:
    return str(exc).split("\n-- while running")[0].splitlines()[0][:500]

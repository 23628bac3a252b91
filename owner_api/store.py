"""The owner API's reads and writes against the warehouse: every statement names the
owner first, so it touches that owner's slice of each table and nothing else.

Values reach SQL only as bound ``{name:Type}`` parameters; column and table names
come from the fixed lists below, never from a request.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa

from owner_api.scopes import EXPORT_COLUMNS, SIGNAL_SCOPE
from vtp.core.cluster_ddl import local_table, on_cluster
from vtp.core.warehouse import Warehouse, rows

SIGNALS = tuple(SIGNAL_SCOPE)
# Stored as Float32; shown through ClickHouse's shortest text form, so 191.4 reads as
# 191.4 in JSON and CSV rather than as the double nearest the float (191.39999389...).
FLOAT32_SIGNALS = (
    "speed",
    "heading",
    "soc",
    "charge_power",
    "battery_temperature",
    "outside_temperature",
    "cabin_temperature",
)


def _as_decimal_text(column: str) -> str:
    return f"toFloat64(toString({column})) AS {column}"


@dataclass(frozen=True)
class Table:
    """An owner table: its key columns (export order). Its columns: owner_api.scopes."""

    name: str
    key: tuple[str, ...]
    final: bool = False  # ReplacingMergeTree: read with FINAL

    @property
    def export_columns(self) -> str:
        return ", ".join(EXPORT_COLUMNS[self.name])


TRIPS = Table("trips", ("vin", "start_time"), True)
CHARGES = Table("charges", ("vin", "start_time"), True)
DAYS = Table("daily_summaries", ("vin", "date"), True)
# Everything an owner has, in export order (the audit log last: it grows while exporting).
EXPORT_TABLES = (
    Table("samples", ("vin", "event_time", "seq")),
    Table("uploads", ("vin", "sent_at", "upload_id")),
    TRIPS,
    CHARGES,
    DAYS,
    Table("open_sessions", ("vin", "kind"), True),
    Table("grants", ("grant_id",), True),
    Table("audit_log", ("at", "request_id")),
)
# The owner's rows everywhere, the analysts' pseudonyms of them included.
ERASED_TABLES = (*(t.name for t in EXPORT_TABLES), "pseudonyms")


# What ClickHouse writes for the API (sample pages, text exports): ISO 8601 times as
# ``jsonable`` writes them, shortest floats, plain 64-bit numbers.
JSON_SETTINGS = (
    " SETTINGS date_time_output_format = 'iso', output_format_json_quote_64bit_integers = 0,"
    " output_format_json_escape_forward_slashes = 0"
)
# An owner's read touches a few granules of their slice: one thread does it with less
# CPU than several (on 100M samples, 411 pages/s on four connections against 344), and
# the API runs many such reads at once.
ONE_THREAD = "max_threads = 1"


def now_ms() -> int:
    return int(time.time() * 1000)


def jsonable(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return value


def records(table: pa.Table) -> list[dict[str, Any]]:
    return [{k: jsonable(v) for k, v in r.items()} for r in table.to_pylist()]


# -- owners and vehicles ----------------------------------------------------------------


def owner_known(wh: Warehouse, owner: str) -> bool:
    """An owner is known here once data, a grant or an erasure of theirs was stored."""
    found = wh.query(
        "SELECT (SELECT count() FROM (SELECT 1 FROM uploads WHERE owner_id = {o:String} LIMIT 1))"
        " + (SELECT count() FROM (SELECT 1 FROM erasures WHERE owner_id = {o:String} LIMIT 1))"
        " + (SELECT count() FROM (SELECT 1 FROM grants WHERE owner_id = {o:String} LIMIT 1))"
        f" SETTINGS {ONE_THREAD}",
        {"o": owner},
    )
    count: int = rows(found)[0][0]
    return count > 0


def vehicles(wh: Warehouse, owner: str) -> list[dict[str, Any]]:
    return records(
        wh.query(
            "SELECT vin, count() AS uploads, sum(sample_count) AS samples, "
            "min(first_event_time) AS first_sample_at, max(last_event_time) AS last_sample_at "
            "FROM uploads WHERE owner_id = {o:String} GROUP BY vin ORDER BY vin",
            {"o": owner},
        )
    )


def owner_vins(wh: Warehouse, owner: str) -> set[str]:
    """Every vehicle the owner has uploads of here (before an erasure takes them)."""
    return {
        vin
        for (vin,) in rows(
            wh.query("SELECT DISTINCT vin FROM uploads WHERE owner_id = {o:String}", {"o": owner})
        )
    }


def owns_vehicle(wh: Warehouse, owner: str, vin: str) -> bool:
    found = wh.query(
        "SELECT count() FROM (SELECT 1 FROM uploads WHERE owner_id = {o:String} "
        f"AND vin = {{v:String}} LIMIT 1) SETTINGS {ONE_THREAD}",
        {"o": owner, "v": vin},
    )
    count: int = rows(found)[0][0]
    return count > 0


# -- samples ----------------------------------------------------------------------------


def samples_page(
    wh: Warehouse,
    owner: str,
    vin: str,
    start_ms: int,
    end_ms: int,
    signals: list[str],
    limit: int,
    after: tuple[int, int] | None,
) -> tuple[list[bytes], tuple[int, int] | None]:
    """Up to ``limit`` samples in [start, end) after the cursor (event time ms, seq), each
    a JSON object as ClickHouse wrote it (the API joins them; formatting a page of 1000
    samples in Python took longer than reading it)."""
    unknown = set(signals) - set(SIGNALS)
    if unknown:
        raise ValueError(f"unknown signals {sorted(unknown)}")
    columns = ", ".join(
        [
            "event_time",
            "seq",
            *(_as_decimal_text(s) if s in FLOAT32_SIGNALS else s for s in signals),
        ]
    )
    after_t, after_seq = after if after else (start_ms, -1)
    body = wh.query_raw(
        f"SELECT {columns} FROM samples "
        "WHERE owner_id = {o:String} AND vin = {v:String} "
        "AND event_time >= fromUnixTimestamp64Milli({s:Int64}, 'UTC') "
        "AND event_time < fromUnixTimestamp64Milli({e:Int64}, 'UTC') "
        "AND (event_time > fromUnixTimestamp64Milli({at:Int64}, 'UTC') "
        "     OR (event_time = fromUnixTimestamp64Milli({at:Int64}, 'UTC') AND seq > {aseq:Int64})) "
        f"ORDER BY event_time, seq LIMIT {{n:UInt32}}{JSON_SETTINGS}, {ONE_THREAD}",
        {
            "o": owner,
            "v": vin,
            "s": start_ms,
            "e": end_ms,
            "at": after_t,
            "aseq": after_seq,
            "n": limit + 1,
        },
        "JSONEachRow",
    )
    page = body.splitlines()
    more = len(page) > limit
    page = page[:limit]
    cursor = None
    if more:
        last = json.loads(page[-1])
        at = datetime.fromisoformat(last["event_time"])
        cursor = (int(at.timestamp() * 1000 + 0.5), int(last["seq"]))
    return page, cursor


# -- aggregates -------------------------------------------------------------------------


def sessions(
    wh: Warehouse,
    table: Table,
    owner: str,
    vin: str | None,
    start_ms: int,
    end_ms: int,
    columns: list[str],
    limit: int,
    dates: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Trips, charges or daily summaries in [start, end), newest first: ``columns`` only
    (what the caller's scopes open, from owner_api.scopes). Daily summaries are about
    local days, so they are chosen by ``dates`` [first, after) as the caller's own
    offsets give them."""
    time_column = "date" if table is DAYS else "start_time"
    when = (
        "date >= {df:Date} AND date < {dt:Date}"
        if table is DAYS
        else "start_time >= fromUnixTimestamp64Milli({s:Int64}, 'UTC') "
        "AND start_time < fromUnixTimestamp64Milli({e:Int64}, 'UTC')"
    )
    first, after = dates or ("1970-01-01", "1970-01-01")
    result = wh.query(
        f"SELECT {', '.join(columns)} FROM {table.name} FINAL "
        "WHERE owner_id = {o:String} AND (empty({v:String}) OR vin = {v:String}) "
        f"AND {when} ORDER BY {time_column} DESC, vin LIMIT {{n:UInt32}} SETTINGS {ONE_THREAD}",
        {
            "o": owner,
            "v": vin or "",
            "s": start_ms,
            "e": end_ms,
            "n": limit,
            "df": first,
            "dt": after,
        },
    )
    return records(result)


# -- grants -----------------------------------------------------------------------------


def create_grant(
    wh: Warehouse, owner: str, party: str, scopes: list[str], expires_ms: int
) -> dict[str, Any]:
    grant_id = uuid.uuid4().hex
    created = now_ms()
    wh.execute(
        "INSERT INTO grants (owner_id, grant_id, party, scopes, created_at, expires_at, "
        "revoked_at, version) VALUES ({o:String}, {g:String}, {p:String}, {sc:Array(String)}, "
        "fromUnixTimestamp64Milli({c:Int64}, 'UTC'), fromUnixTimestamp64Milli({x:Int64}, 'UTC'), "
        "NULL, {ver:UInt64})",
        {
            "o": owner,
            "g": grant_id,
            "p": party,
            "sc": scopes,
            "c": created,
            "x": expires_ms,
            "ver": created,
        },
    )
    return get_grant(wh, owner, grant_id) or {}


def list_grants(wh: Warehouse, owner: str) -> list[dict[str, Any]]:
    return records(
        wh.query(
            "SELECT grant_id, party, scopes, created_at, expires_at, revoked_at FROM grants FINAL "
            "WHERE owner_id = {o:String} ORDER BY created_at, grant_id",
            {"o": owner},
        )
    )


def get_grant(wh: Warehouse, owner: str, grant_id: str) -> dict[str, Any] | None:
    found = records(
        wh.query(
            "SELECT grant_id, party, scopes, created_at, expires_at, revoked_at FROM grants FINAL "
            "WHERE owner_id = {o:String} AND grant_id = {g:String}",
            {"o": owner, "g": grant_id},
        )
    )
    return found[0] if found else None


def revoke_grant(wh: Warehouse, owner: str, grant_id: str) -> dict[str, Any] | None:
    """Mark the grant revoked (idempotent); None when the owner has no such grant."""
    wh.execute(
        "INSERT INTO grants (owner_id, grant_id, party, scopes, created_at, expires_at, "
        "revoked_at, version) SELECT owner_id, grant_id, party, scopes, created_at, expires_at, "
        "coalesce(revoked_at, fromUnixTimestamp64Milli({r:Int64}, 'UTC')), {r:UInt64} "
        "FROM grants FINAL WHERE owner_id = {o:String} AND grant_id = {g:String}",
        {"o": owner, "g": grant_id, "r": now_ms()},
    )
    return get_grant(wh, owner, grant_id)


# -- audit ------------------------------------------------------------------------------


def access_log(wh: Warehouse, owner: str, limit: int) -> list[dict[str, Any]]:
    return records(
        wh.query(
            "SELECT at, request_id, actor, grant_id, action, resource, detail, rows, status "
            "FROM audit_log WHERE owner_id = {o:String} ORDER BY at DESC, request_id "
            "LIMIT {n:UInt32}",
            {"o": owner, "n": limit},
        )
    )


# -- export -----------------------------------------------------------------------------


def owner_row_counts(wh: Warehouse, owner: str) -> dict[str, int]:
    counts = {}
    for table in EXPORT_TABLES:
        final = " FINAL" if table.final else ""
        found = wh.query(
            f"SELECT count() FROM {table.name}{final} WHERE owner_id = {{o:String}}", {"o": owner}
        )
        counts[table.name] = rows(found)[0][0]
    return counts


TEXT_FORMATS = {"jsonl": ("JSONEachRow", "JSONEachRow"), "csv": ("CSVWithNames", "CSV")}
TEXT_SETTINGS = f"{JSON_SETTINGS}, format_csv_null_representation = ''"


# How each key column is bound: its parameter type and how a value read back is passed.
_KEY_TYPES = {
    "event_time": "ts",
    "sent_at": "ts",
    "start_time": "ts",
    "at": "ts",
    "date": "date",
    "seq": "u64",
}


def _key_param(column: str, name: str) -> str:
    kind = _KEY_TYPES.get(column, "str")
    if kind == "ts":
        return f"fromUnixTimestamp64Milli({{{name}:Int64}}, 'UTC')"
    return f"{{{name}:{ {'date': 'Date', 'u64': 'UInt64'}.get(kind, 'String') }}}"


def _key_value(column: str, value: object) -> object:
    kind = _KEY_TYPES.get(column, "str")
    if kind == "ts":
        assert isinstance(value, datetime)
        return int(value.timestamp() * 1000 + 0.5)
    if kind == "date":
        assert isinstance(value, date)
        return value.isoformat()
    return value


def _after(key: tuple[str, ...], prefix: str) -> str:
    """SQL for "key > ({prefix}0, {prefix}1, ...)" in lexicographic order, written as an
    OR of conjunctions over key columns, which ClickHouse answers from the primary key."""
    terms = []
    for i, column in enumerate(key):
        equal = [f"{c} = {_key_param(c, f'{prefix}{j}')}" for j, c in enumerate(key[:i])]
        terms.append(" AND ".join([*equal, f"{column} > {_key_param(column, f'{prefix}{i}')}"]))
    return "(" + " OR ".join(f"({t})" for t in terms) + ")"


def _pages(
    wh: Warehouse, owner: str, table: Table, page_rows: int
) -> Iterator[tuple[str, dict[str, object]]]:
    """(WHERE clause, params) of each page, in key order. Keyset paging: each page
    starts after the last key of the one before, so every page costs the same."""
    final = " FINAL" if table.final else ""
    order = ", ".join(table.key)
    last: dict[str, object] | None = None
    while True:
        where = "owner_id = {o:String}"
        params: dict[str, object] = {"o": owner}
        if last is not None:
            where += " AND " + _after(table.key, "a")
            params |= last
        boundary = wh.query(
            f"SELECT {order} FROM {table.name}{final} WHERE {where} ORDER BY {order} "
            f"LIMIT 1 OFFSET {{skip:UInt64}}",
            params | {"skip": page_rows - 1},
        ).to_pylist()
        if not boundary:
            yield where, params  # the rest, fewer than page_rows (maybe none)
            return
        upto = {f"b{i}": _key_value(c, boundary[0][c]) for i, c in enumerate(table.key)}
        yield f"{where} AND NOT {_after(table.key, 'b')}", params | upto
        last = {f"a{i}": v for i, v in enumerate(upto.values())}


def export_pages(
    wh: Warehouse, owner: str, table: Table, page_rows: int = 50_000
) -> Iterator[pa.Table]:
    """The owner's rows of ``table`` in key order as Arrow, about ``page_rows`` at a time."""
    final = " FINAL" if table.final else ""
    for i, (where, params) in enumerate(_pages(wh, owner, table, page_rows)):
        page = wh.query(
            f"SELECT {table.export_columns} FROM {table.name}{final} WHERE {where} "
            f"ORDER BY {', '.join(table.key)}",
            params,
        )
        if page.num_rows or i == 0:
            yield page  # an empty first page still tells the writer the columns


def export_text_pages(
    wh: Warehouse, owner: str, table: Table, fmt: str, page_rows: int = 50_000
) -> Iterator[tuple[bytes, int]]:
    """(formatted bytes, rows) pages of the owner's rows; CSV's header on the first."""
    first_format, next_format = TEXT_FORMATS[fmt]
    final = " FINAL" if table.final else ""
    for i, (where, params) in enumerate(_pages(wh, owner, table, page_rows)):
        data = wh.query_raw(
            f"SELECT {table.export_columns} FROM {table.name}{final} WHERE {where} "
            f"ORDER BY {', '.join(table.key)}" + TEXT_SETTINGS,
            params,
            first_format if i == 0 else next_format,
        )
        yield data, _count_rows(data, fmt, header=i == 0)


def _count_rows(data: bytes, fmt: str, header: bool) -> int:
    if fmt == "jsonl":
        return data.count(b"\n")  # JSON escapes newlines inside strings
    rows_ = sum(1 for _ in csv.reader(io.StringIO(data.decode())))
    return rows_ - 1 if header else rows_


# -- erasure ----------------------------------------------------------------------------


def record_erasure(wh: Warehouse, owner: str) -> tuple[str, int]:
    erasure_id, requested = uuid.uuid4().hex, now_ms()
    wh.execute(
        "INSERT INTO erasures (owner_id, erasure_id, requested_at, completed_at, rows_deleted, "
        "version) VALUES ({o:String}, {e:String}, fromUnixTimestamp64Milli({t:Int64}, 'UTC'), "
        "NULL, '', 1)",
        {"o": owner, "e": erasure_id, "t": requested},
    )
    return erasure_id, requested


def erase_owner(wh: Warehouse, owner: str, cluster: str = "") -> dict[str, int]:
    """Remove every row of the owner from every owner table; rows deleted per table.

    ALTER TABLE ... DELETE rewrites the parts that hold the rows (compliance-grade,
    unlike a lightweight DELETE, which only hides them until a merge)."""
    deleted = owner_row_counts(wh, owner)
    for table in ERASED_TABLES:
        wh.execute(erase_statement(table, cluster), {"o": owner})
    return deleted


def erase_statement(table: str, cluster: str = "") -> str:
    """The delete of one owner's rows (``{o:String}``) from ``table``. On a cluster it runs
    on every shard's local table (a Distributed table takes no mutation); mutations_sync = 2
    waits for every replica of each shard."""
    return (
        f"ALTER TABLE {local_table(table, cluster)}{on_cluster(cluster)} "
        "DELETE WHERE owner_id = {o:String} SETTINGS mutations_sync = 2"
    )


def complete_erasure(
    wh: Warehouse, owner: str, erasure_id: str, requested_ms: int, deleted: dict[str, int]
) -> None:
    wh.execute(
        "INSERT INTO erasures (owner_id, erasure_id, requested_at, completed_at, rows_deleted, "
        "version) VALUES ({o:String}, {e:String}, fromUnixTimestamp64Milli({t:Int64}, 'UTC'), "
        "fromUnixTimestamp64Milli({c:Int64}, 'UTC'), {d:String}, 2)",
        {"o": owner, "e": erasure_id, "t": requested_ms, "c": now_ms(), "d": json.dumps(deleted)},
    )


def erasures(wh: Warehouse, owner: str) -> list[dict[str, Any]]:
    """The owner's erasures, oldest first, each with its status (pending or completed)."""
    found = records(
        wh.query(
            "SELECT erasure_id, requested_at, completed_at, rows_deleted FROM erasures FINAL "
            "WHERE owner_id = {o:String} ORDER BY requested_at",
            {"o": owner},
        )
    )
    for erasure in found:
        erasure["status"] = "pending" if erasure["completed_at"] is None else "completed"
        erasure["rows_deleted"] = json.loads(erasure["rows_deleted"] or "null")
    return found


def pending_erasures(wh: Warehouse) -> list[tuple[str, str, int]]:
    """(owner, erasure id, requested ms) of erasures not completed, oldest first."""
    return [
        (owner, erasure_id, int(requested))
        for owner, erasure_id, requested in rows(
            wh.query(
                "SELECT owner_id, erasure_id, toUnixTimestamp64Milli(requested_at) "
                "FROM erasures FINAL WHERE completed_at IS NULL ORDER BY requested_at"
            )
        )
    ]

"""The warehouse: ClickHouse through clickhouse-connect, embedded (chdb) or a server.

One driver runs both modes, so the tests on the embedded engine exercise the client code a
server deployment runs; vtp.core.warehouse_targets holds the little that differs (where
clients point, how bytes handed to a statement travel). Statements run on a few clients
side by side: an owner API answers a request in a few milliseconds of engine time, and one
connection would queue every request behind the others (measured on 100M samples: 181
pages/s on one connection, 300 on four, on 2 cores). Writes have clients of their own, so
a read never waits behind a long insert.

Parameters are always bound with ClickHouse's ``{name:Type}`` syntax, never formatted
into SQL text. Bytes a statement reads as a table (an Avro container the sink hands over
whole, for instance) are named ``@name`` in its SQL and passed as ``Input``.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pyarrow as pa

from vtp.core.settings import Settings
from vtp.core.warehouse_targets import (
    ClickHouseServer,
    EmbeddedEngine,
    Input,
    Target,
    WarehouseBusy,
    WarehouseError,
    bind_inputs,
)

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

__all__ = ["Input", "WarehouseBusy", "WarehouseError", "bind_inputs"]

_T = TypeVar("_T")


# Settings a statement may carry; values are checked, never formatted in unchecked.
StatementSettings = Mapping[str, int | str]


class Warehouse(Protocol):
    description: str

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None: ...

    def query(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table: ...

    def query_raw(self, sql: str, params: dict[str, Any] | None, fmt: str) -> bytes:
        """The result in a ClickHouse output format (JSONEachRow, CSVWithNames, ...)."""
        ...

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int: ...

    def query_inputs(
        self, sql: str, inputs: Mapping[str, Input], params: dict[str, Any] | None = None
    ) -> pa.Table:
        """A read of ``inputs`` (and tables), on a reader like ``query``."""
        ...

    def execute_inputs(
        self,
        sql: str,
        inputs: Mapping[str, Input],
        params: dict[str, Any] | None,
        settings: StatementSettings,
    ) -> None:
        """A statement (``INSERT … SELECT … FROM @name``) with its settings, e.g. a
        deduplication token; one at a time with the other writes."""
        ...

    def analyst_query(
        self, sql: str, params: dict[str, Any] | None, settings: dict[str, str]
    ) -> pa.Table:
        """A query on a read-only connection of its own whose ``settings`` (limits) no
        statement can change; it runs beside, not behind, the other statements."""
        ...

    def analyst_lines(
        self, sql: str, params: dict[str, Any] | None, settings: dict[str, str]
    ) -> list[str]:
        """What a statement prints, line by line (``EXPLAIN``, whose output cannot take a
        FORMAT clause: one after it belongs to the explained query), as ``analyst_query``
        runs it."""
        ...

    def close(self) -> None: ...


def rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """An Arrow result as a list of row tuples."""
    columns = [c.to_pylist() for c in table.columns]
    return list(zip(*columns, strict=True)) if columns else []


class _Clients:
    """Up to ``size`` clients of one target, opened when first needed and kept."""

    def __init__(self, target: Target, size: int):
        self._target = target
        self._size = max(1, size)
        self._idle: list[Client] = []
        self._open = 0
        self._free = threading.Condition()
        self.closed = False

    @contextlib.contextmanager
    def lease(self) -> Iterator[Client]:
        with self._free:
            while not self.closed and not self._idle:
                if self._open < self._size:
                    self._open += 1
                    break
                self._free.wait()
            if self.closed:
                raise WarehouseError(f"the warehouse {self._target.description} is closed")
            client = self._idle.pop() if self._idle else None
        if client is None:
            try:
                client = self._target.client()
            except BaseException:
                self._drop(None)
                raise
        usable = True
        try:
            yield client
        except _Poisoned:
            usable = False
            raise
        except Exception:
            raise  # drained already: the client answers cleanly again
        except BaseException:
            usable = False  # interrupted mid-statement: its output may still be pending
            raise
        finally:
            pooled = False
            if usable:
                with self._free:
                    if not self.closed:
                        self._idle.append(client)
                        self._free.notify()
                        pooled = True
            if not pooled:
                self._drop(client)

    def _drop(self, client: Client | None) -> None:
        """A client closed for good (the warehouse closed, or a failed statement's output
        could not be read away): its slot is free again."""
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        with self._free:
            self._open -= 1
            self._free.notify()

    def close(self) -> None:
        """Later leases are refused; a statement still running closes its client when it
        ends (the embedded engine lets go of the folder with the last one)."""
        with self._free:
            self.closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._free.notify_all()
        for client in idle:
            with contextlib.suppress(Exception):
                client.close()


class _Poisoned(WarehouseError):
    """A statement failed and what it had output could not be read away: the client must
    not answer anyone again."""


def _drain(client: Client) -> bool:
    """chdb 4.4 hands what a failed statement had output to the next statement on the same
    connection (another caller's answer would begin with it): read it away. False when
    the client still does not answer a plain ``SELECT 1``."""
    try:
        # the first answer may be the leftover
        return any(client.raw_query("SELECT 1", fmt="CSV") == b"1\n" for _ in range(2))
    except Exception:  # the original error is what the caller needs
        return False


class ClickHouseWarehouse:
    """The Warehouse on clickhouse-connect clients of one target."""

    def __init__(self, target: Target, clients: int = 4):
        self.description = target.description
        self._target = target
        self._readers = _Clients(target, clients)
        self._writers = _Clients(target, 1 if target.serial_writes else clients)
        # Open one client now: a wrong URL fails at start, and the embedded engine holds
        # its folder from here on (another process gets WarehouseBusy).
        try:
            with self._writers.lease():
                pass
        except BaseException:
            target.close()
            raise

    def _on(self, clients: _Clients, sql: str, call: Callable[[Client], _T]) -> _T:
        with clients.lease() as client:
            try:
                return call(client)
            except Exception as exc:
                error = WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}")
                if not _drain(client):
                    raise _Poisoned(str(error)) from None
                raise error from None

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._on(self._writers, sql, lambda c: c.command(sql, parameters=params or None))

    def query(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        return self._on(self._readers, sql, lambda c: c.query_arrow(sql, parameters=params or None))

    def query_raw(self, sql: str, params: dict[str, Any] | None, fmt: str) -> bytes:
        return self._on(
            self._readers, sql, lambda c: c.raw_query(sql, parameters=params or None, fmt=fmt)
        )

    def query_inputs(
        self, sql: str, inputs: Mapping[str, Input], params: dict[str, Any] | None = None
    ) -> pa.Table:
        with self._target.with_inputs(sql, inputs) as (bound, external):
            return self._on(
                self._readers,
                sql,
                lambda c: c.query_arrow(bound, parameters=params or None, external_data=external),
            )

    def execute_inputs(
        self,
        sql: str,
        inputs: Mapping[str, Input],
        params: dict[str, Any] | None,
        settings: StatementSettings,
    ) -> None:
        checked = _checked(settings)
        with self._target.with_inputs(sql, inputs) as (bound, external):
            statement, client_settings = self._target.with_settings(bound, checked)
            self._on(
                self._writers,
                sql,
                lambda c: c.raw_query(
                    statement,
                    parameters=params or None,
                    settings=client_settings or None,
                    external_data=external,
                ),
            )

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int:
        if data.num_rows == 0:
            return 0
        # A batch whose rows span more than 100 months is stored (a part per month), not
        # refused on every retry.
        settings: dict[str, Any] = {"throw_on_max_partitions_per_insert_block": 0}
        if dedup_token is not None:
            # Tokens are built by the sink from topic/partition/offsets: [a-z0-9.-] only.
            settings["insert_deduplication_token"] = _safe_token(dedup_token)
        self._on(
            self._writers,
            f"INSERT INTO {table}",
            lambda c: self._target.insert_arrow(c, table, data, settings),
        )
        inserted: int = data.num_rows  # pyarrow has no annotations
        return inserted

    def analyst_query(
        self, sql: str, params: dict[str, Any] | None, settings: dict[str, str]
    ) -> pa.Table:
        return self._as_analyst(sql, settings, lambda c: c.query_arrow(sql, parameters=params))

    def analyst_lines(
        self, sql: str, params: dict[str, Any] | None, settings: dict[str, str]
    ) -> list[str]:
        # No format named: the engine's default, TabSeparated, one row per line.
        text = self._as_analyst(
            sql, settings, lambda c: c.raw_query(sql, parameters=params or None, fmt=None)
        )
        # Split on newlines only: TabSeparated leaves other line separators (U+2028, \x1c, ...)
        # unescaped inside a value; bytes that are not UTF-8 cannot matter to a parse check.
        lines = text.decode(errors="replace").split("\n")
        return [_tsv_value(line) for line in (lines[:-1] if lines[-1] == "" else lines)]

    def _as_analyst(self, sql: str, settings: dict[str, str], call: Callable[[Client], _T]) -> _T:
        # readonly last: once set, nothing on this client can change the limits before it.
        fixed = {k: v for k, v in settings.items() if k != "readonly"}
        if "readonly" in settings:
            fixed["readonly"] = settings["readonly"]
        # A fresh client per query: its settings are fixed from the start, and a failed
        # query's leftovers die with it.
        if self._readers.closed:
            raise WarehouseError(f"the warehouse {self.description} is closed")
        client = self._target.client(fixed)
        try:
            return call(client)
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}") from None
        finally:
            client.close()

    def close(self) -> None:
        self._writers.close()
        self._readers.close()
        self._target.close()


class ChdbWarehouse(ClickHouseWarehouse):
    """The embedded engine in the folder ``path``."""

    def __init__(self, path: Path, readers: int = 4):
        engine = EmbeddedEngine(path)
        super().__init__(engine, readers)
        self.inputs_folder = engine.inputs_folder


class ServerWarehouse(ClickHouseWarehouse):
    """A ClickHouse server; ``url`` names the region's database (``{region}`` is filled)."""

    def __init__(self, url: str, region: str, clients: int = 4, cluster: str = ""):
        super().__init__(ClickHouseServer(url, region, cluster_session(cluster)), clients)


def cluster_session(cluster: str) -> dict[str, str]:
    """What every statement on a cluster's Distributed tables needs."""
    if not cluster:
        return {}
    # An insert returns once every shard has its rows: otherwise the Distributed table
    # queues them on this node and answers at once (the sink would commit offsets for
    # rows no shard holds yet), and its background sends regroup the rows, so a retried
    # insert's deduplication token would no longer match what a shard stored. Named as
    # servers before 23.x know it; newer ones take it as an alias of
    # distributed_foreground_insert.
    return {"insert_distributed_sync": "1"}


_TSV_ESCAPES = {"b": "\b", "f": "\f", "r": "\r", "n": "\n", "t": "\t", "0": "\0"}


def _tsv_value(field: str) -> str:
    """One TabSeparated field as the value it stands for."""
    return re.sub(r"\\(.)", lambda m: _TSV_ESCAPES.get(m.group(1), m.group(1)), field)


def _checked(settings: StatementSettings) -> dict[str, int | str]:
    """Settings vtp chose, checked (names and values), never passed on unchecked."""
    checked: dict[str, int | str] = {}
    for name, value in settings.items():
        if not name.replace("_", "").isalnum():
            raise ValueError(f"unsafe setting name {name!r}")
        checked[name] = value if isinstance(value, int) else _safe_token(value)
    return checked


def _safe_token(token: str) -> str:
    if not all(c.isalnum() or c in ".-_:" for c in token):
        raise ValueError(f"unsafe deduplication token {token!r}")
    return token


def open_warehouse(settings: Settings) -> Warehouse:
    """The region's warehouse: embedded by default, a server when VTP_WAREHOUSE is a URL."""
    region = settings.need_region()
    if settings.warehouse == "chdb":
        return ChdbWarehouse(settings.warehouse_path, settings.warehouse_readers)
    if settings.warehouse.startswith(("http://", "https://")):
        return ServerWarehouse(
            settings.warehouse, region, settings.warehouse_readers, settings.warehouse_cluster
        )
    shown = settings.shown("warehouse")
    raise WarehouseError(
        f"VTP_WAREHOUSE={shown!r}: use 'chdb' or an http(s):// URL of a ClickHouse server"
    )

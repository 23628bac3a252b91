"""The warehouse interface and its two drivers, sharing every SQL statement.

- ChdbWarehouse: the ClickHouse engine in-process (chdb), one folder per region.
  chdb locks the folder: only one process may open it at a time. Writes go one at a
  time through one connection; reads run side by side on a few connections of their own
  (the engine runs statements of different connections in parallel).
- ServerWarehouse: a ClickHouse server over HTTP (clickhouse-connect).

Parameters are always bound with ClickHouse's ``{name:Type}`` syntax, never
formatted into SQL text. Bytes a statement reads as a table (an Avro container the sink
hands over whole, for instance) are named ``@name`` in its SQL and passed as ``Input``:
the embedded engine reads them from a private temporary file, a server as external data
sent with the query.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict
from urllib.parse import unquote, urlparse

import pyarrow as pa

from vtp.core.settings import Settings

if TYPE_CHECKING:
    from chdb.state.sqlitelike import StreamingInserter
    from clickhouse_connect.driver.client import Client
    from clickhouse_connect.driver.external import ExternalData


class WarehouseError(RuntimeError):
    """A statement failed in the warehouse."""


class WarehouseBusy(WarehouseError):
    """The embedded warehouse folder is open in another process."""


@dataclass(frozen=True)
class Input:
    """Bytes a statement reads as a table, ``@name`` in its SQL."""

    data: bytes
    fmt: str  # a ClickHouse input format: Avro, ArrowStream, ...
    structure: str  # the columns, as ClickHouse's file() and external data take them


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

    def close(self) -> None: ...


def rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """An Arrow result as a list of row tuples."""
    columns = [c.to_pylist() for c in table.columns]
    return list(zip(*columns, strict=True)) if columns else []


def _param_text(value: Any) -> str:
    """A parameter in the text form ClickHouse parses for ``{name:Type}``."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(_param_literal(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # scalars are parsed in the escaped (TSV) form
        return (
            value.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return str(value)


def _param_literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "NULL"
    return _param_text(value)


class _ChdbResult(Protocol):
    def bytes(self) -> bytes: ...


class _ChdbSession(Protocol):
    """What vtp uses of chdb's Session, which chdb leaves unannotated."""

    def query(
        self, sql: str, fmt: str = ..., *, params: dict[str, str] | None = ...
    ) -> _ChdbResult: ...

    def send_insert(self, query: str, fmt: str = ...) -> StreamingInserter: ...

    def close(self) -> None: ...


class ChdbWarehouse:
    _session: _ChdbSession

    def __init__(self, path: Path, readers: int = 4):
        from chdb.session import Session

        path.mkdir(parents=True, exist_ok=True)
        self.description = f"chdb:{path}"
        if _locked_by_another_process(path / "status"):
            raise WarehouseBusy(
                f"the embedded warehouse {path} is open in another process (a running "
                "`vtp serve` or `vtp sink` for this region?); stop it first, ask the owner API, "
                "or point VTP_WAREHOUSE at a ClickHouse server"
            )
        try:
            self._session = Session(str(path))  # type: ignore[no-untyped-call]  # chdb: untyped
        except Exception as exc:
            raise WarehouseError(f"cannot open the embedded warehouse {path}: {exc}") from None
        self._path = path
        # One engine per process: `vtp serve` shares it between the sink and the API's
        # request threads. Statements that change anything run one at a time here...
        self._lock = threading.RLock()
        # ...and reads on up to `readers` connections at once: an owner API answers a
        # request in a few milliseconds of engine time, and one connection would queue
        # every request behind the others (measured on 100M samples: 181 pages/s on one
        # connection, 300 on four, on 2 cores).
        self._max_readers = max(1, readers)
        self._idle_readers: list[_ChdbSession] = []
        self._open_readers = 0
        self._readers_free = threading.Condition()
        self._closed = False
        # Bytes handed to a statement (Input) wait here as files while it runs: inside the
        # warehouse's folder (they are its data), emptied when it opens and closes.
        self.inputs_folder = path / "vtp-inputs"
        shutil.rmtree(self.inputs_folder, ignore_errors=True)
        self.inputs_folder.mkdir()

    def _run(self, sql: str, fmt: str, params: dict[str, Any] | None) -> _ChdbResult:
        with self._lock:
            return _run_on(self._session, sql, fmt, params)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[_ChdbSession]:
        with self._readers_free:
            while not self._closed and not self._idle_readers:
                if self._open_readers < self._max_readers:
                    self._open_readers += 1
                    break
                self._readers_free.wait()
            if self._closed:
                raise WarehouseError(f"the embedded warehouse {self._path} is closed")
            connection = self._idle_readers.pop() if self._idle_readers else None
        if connection is None:
            try:
                connection = self._open_reader()
            except Exception as exc:
                self._drop_reader(None)
                raise WarehouseError(f"cannot open a reader on {self._path}: {exc}") from None
        usable = True
        try:
            yield connection
        except _Poisoned:
            usable = False
            raise
        finally:
            pooled = False
            if usable:
                with self._readers_free:
                    if not self._closed:
                        self._idle_readers.append(connection)
                        self._readers_free.notify()
                        pooled = True
            if not pooled:
                self._drop_reader(connection)

    def _drop_reader(self, connection: _ChdbSession | None) -> None:
        """A reader closed for good (the warehouse closed, or a failed statement's output
        could not be read away): its slot is free again."""
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
        with self._readers_free:
            self._open_readers -= 1
            self._readers_free.notify()

    def _open_reader(self) -> _ChdbSession:
        from chdb.state import connect

        reader: _ChdbSession = connect(str(self._path))
        return reader

    def _read(self, sql: str, fmt: str, params: dict[str, Any] | None) -> _ChdbResult:
        with self._reader() as connection:
            return _run_on(connection, sql, fmt, params)

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._run(sql, "CSV", params)

    def query(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        from chdb.state.sqlitelike import to_arrowTable

        result = self._read(sql, "Arrow", params)
        return to_arrowTable(result)  # type: ignore[no-untyped-call]  # chdb: untyped

    def query_raw(self, sql: str, params: dict[str, Any] | None, fmt: str) -> bytes:
        return self._read(sql, fmt, params).bytes()

    def query_inputs(
        self, sql: str, inputs: Mapping[str, Input], params: dict[str, Any] | None = None
    ) -> pa.Table:
        with _input_files(inputs, self.inputs_folder) as sources:
            return self.query(bind_inputs(sql, sources), params)

    def execute_inputs(
        self,
        sql: str,
        inputs: Mapping[str, Input],
        params: dict[str, Any] | None,
        settings: StatementSettings,
    ) -> None:
        with _input_files(inputs, self.inputs_folder) as sources:
            self.execute(bind_inputs(sql, sources) + settings_clause(settings), params)

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int:
        if data.num_rows == 0:
            return 0
        buf = io.BytesIO()
        with pa.ipc.new_stream(buf, data.schema) as writer:
            writer.write_table(data)
        columns = ", ".join(f"`{name}`" for name in data.column_names)
        # A batch whose rows span more than 100 months is stored (a part per month), not
        # refused on every retry.
        settings = " SETTINGS throw_on_max_partitions_per_insert_block = 0"
        if dedup_token is not None:
            # Tokens are built by the sink from topic/partition/offsets: [a-z0-9.-] only.
            settings += f", insert_deduplication_token = '{_safe_token(dedup_token)}'"
        with self._lock:
            try:
                with self._session.send_insert(
                    f"INSERT INTO {table} ({columns}){settings}", "ArrowStream"
                ) as inserter:
                    inserter.append(buf.getvalue())
                    inserter.finish()
            except Exception as exc:
                _drain(self._session)
                raise WarehouseError(f"insert into {table} failed: {exc}") from None
        inserted: int = data.num_rows  # pyarrow has no annotations
        return inserted

    def analyst_query(
        self, sql: str, params: dict[str, Any] | None, settings: dict[str, str]
    ) -> pa.Table:
        from chdb.state import connect

        options = "&".join(f"{k}={v}" for k, v in settings.items())
        bound = {k: _param_text(v) for k, v in (params or {}).items()}
        # A fresh connection per query: its settings are fixed from the start, and a
        # failed query's leftovers die with it.
        connection = connect(f"{self._path}?{options}")
        try:
            return connection.query(sql, "ArrowTable", params=bound)
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}") from None
        finally:
            connection.close()

    def close(self) -> None:
        """Closes the warehouse; a read still running closes its connection when it ends
        (the engine lets go of the folder with the last one), later reads are refused."""
        with self._lock, self._readers_free:
            self._closed = True
            for reader in self._idle_readers:
                reader.close()
            self._open_readers -= len(self._idle_readers)
            self._idle_readers.clear()
            self._readers_free.notify_all()
            self._session.close()
            shutil.rmtree(self.inputs_folder, ignore_errors=True)


def _run_on(
    connection: _ChdbSession, sql: str, fmt: str, params: dict[str, Any] | None
) -> _ChdbResult:
    bound = {k: _param_text(v) for k, v in (params or {}).items()}
    try:
        return connection.query(sql, fmt, params=bound)
    except Exception as exc:
        error = WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}")
        if not _drain(connection):
            raise _Poisoned(str(error)) from None
        raise error from None


class _Poisoned(WarehouseError):
    """A statement failed and what it had output could not be read away: the connection
    must not answer anyone again."""


def _drain(connection: _ChdbSession) -> bool:
    """chdb 4.4 hands what a failed statement had output to the next statement on the
    same connection (another caller's answer would begin with it): read it away. False
    when the connection still does not answer a plain ``SELECT 1``."""
    try:
        return connection.query("SELECT 1", "CSV").bytes() == b"1\n"
    except Exception:  # the original error is what the caller needs
        return False


_INPUT = re.compile(r"@([a-z_][a-z0-9_]*)")


def bind_inputs(sql: str, sources: Mapping[str, str]) -> str:
    """``sql`` with each ``@name`` replaced by the table expression of that input."""
    named = set(_INPUT.findall(sql))
    if named != set(sources):
        raise WarehouseError(f"the statement names inputs {sorted(named)}, given {sorted(sources)}")
    return _INPUT.sub(lambda m: sources[m.group(1)], sql)


@contextlib.contextmanager
def _input_files(inputs: Mapping[str, Input], folder: Path) -> Iterator[dict[str, str]]:
    """Each input in a file of ``folder``, as a ``file()`` expression; the files are gone
    when the statement is."""
    paths: list[str] = []
    try:
        sources = {}
        for name, given in inputs.items():
            handle, path = tempfile.mkstemp(dir=folder, suffix=f".{given.fmt.lower()}")
            paths.append(path)
            with os.fdopen(handle, "wb") as out:
                out.write(given.data)
            sources[name] = "file({})".format(
                ", ".join(_param_literal(x) for x in (path, given.fmt, given.structure))
            )
        yield sources
    finally:
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


def settings_clause(settings: StatementSettings) -> str:
    """`` SETTINGS k = v, …`` for names and values vtp chose (checked, not escaped)."""
    if not settings:
        return ""
    parts = []
    for name, value in settings.items():
        if not name.replace("_", "").isalnum():
            raise ValueError(f"unsafe setting name {name!r}")
        parts.append(
            f"{name} = {value}" if isinstance(value, int) else f"{name} = '{_safe_token(value)}'"
        )
    return " SETTINGS " + ", ".join(parts)


class _ClientArgs(TypedDict, total=False):
    """The arguments of clickhouse_connect.get_client that vtp passes."""

    host: str | None
    port: int
    username: str
    password: str
    secure: bool
    database: str


class ServerWarehouse:
    def __init__(self, url: str, region: str):
        import clickhouse_connect

        parsed = urlparse(url.replace("{region}", region))
        database = parsed.path.strip("/") or f"vtp_{region}"
        if region not in database:
            raise WarehouseError(
                f"the warehouse database {database!r} is not the region's own: name it after "
                "the region, e.g. VTP_WAREHOUSE=http://user:pass@host:8123/vtp_{region}"
            )
        self.description = f"{parsed.scheme}://{parsed.hostname}:{parsed.port}/{database}"
        self._connect: _ClientArgs = {
            "host": parsed.hostname,
            "port": parsed.port or (8443 if parsed.scheme == "https" else 8123),
            "username": unquote(parsed.username or "default"),
            "password": unquote(parsed.password or ""),
            "secure": parsed.scheme == "https",
        }
        # A client (a session) per thread: one session used by two requests at once
        # answers SESSION_IS_LOCKED.
        self._local = threading.local()
        self._clients: list[Client] = []
        self._clients_lock = threading.Lock()
        try:
            admin = clickhouse_connect.get_client(**self._connect)
            admin.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
            admin.close()
            self._connect["database"] = database
            self._client  # noqa: B018 - connect now, so a wrong URL fails at start
        except Exception as exc:
            raise WarehouseError(f"cannot reach ClickHouse at {self.description}: {exc}") from None

    @property
    def _client(self) -> Client:
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            import clickhouse_connect

            client = self._local.client = clickhouse_connect.get_client(**self._connect)
            with self._clients_lock:
                self._clients.append(client)
        return client

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        try:
            self._client.command(sql, parameters=params or None)
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}") from None

    def query(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        try:
            return self._client.query_arrow(sql, parameters=params or None)
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}") from None

    def query_raw(self, sql: str, params: dict[str, Any] | None, fmt: str) -> bytes:
        try:
            return self._client.raw_query(sql, parameters=params or None, fmt=fmt)
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}") from None

    def query_inputs(
        self, sql: str, inputs: Mapping[str, Input], params: dict[str, Any] | None = None
    ) -> pa.Table:
        external, bound = _external(sql, inputs)
        try:
            return self._client.query_arrow(
                bound, parameters=params or None, external_data=external
            )
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}") from None

    def execute_inputs(
        self,
        sql: str,
        inputs: Mapping[str, Input],
        params: dict[str, Any] | None,
        settings: StatementSettings,
    ) -> None:
        external, bound = _external(sql, inputs)
        settings_clause(settings)  # the same checks as the embedded engine's
        try:
            self._client.raw_query(
                bound,
                parameters=params or None,
                settings=dict(settings),
                external_data=external,
            )
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}") from None

    def analyst_query(
        self, sql: str, params: dict[str, Any] | None, settings: dict[str, str]
    ) -> pa.Table:
        try:
            return self._client.query_arrow(sql, parameters=params or None, settings=settings)
        except Exception as exc:
            raise WarehouseError(f"{exc}\n-- while running: {sql.strip()[:500]}") from None

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int:
        if data.num_rows == 0:
            return 0
        settings: dict[str, Any] = {"throw_on_max_partitions_per_insert_block": 0}
        if dedup_token:
            settings["insert_deduplication_token"] = dedup_token
        try:
            self._client.insert_arrow(table, data, settings=settings)
        except Exception as exc:
            raise WarehouseError(f"insert into {table} failed: {exc}") from None
        inserted: int = data.num_rows  # pyarrow has no annotations
        return inserted

    def close(self) -> None:
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()


def _external(sql: str, inputs: Mapping[str, Input]) -> tuple[ExternalData, str]:
    """The inputs as external data sent with the query (a temporary table each)."""
    from clickhouse_connect.driver.external import ExternalData

    external = ExternalData()
    for name, given in inputs.items():
        external.add_file(file_name=name, data=given.data, fmt=given.fmt, structure=given.structure)
    return external, bind_inputs(sql, {name: name for name in inputs})


def _locked_by_another_process(status_file: Path) -> bool:
    """ClickHouse holds an flock on <path>/status while an engine has the folder open."""
    if not status_file.exists():
        return False
    with open(status_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


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
        return ServerWarehouse(settings.warehouse, region)
    shown = settings.shown("warehouse")
    raise WarehouseError(
        f"VTP_WAREHOUSE={shown!r}: use 'chdb' or an http(s):// URL of a ClickHouse server"
    )

"""Where the warehouse's clickhouse-connect clients point: the embedded engine or a server.

Everything else (statements, parameters, settings, errors, the client pools) is the same
code for both, in vtp.core.warehouse. What differs is only what the embedded engine
cannot do as a server does:

- Bytes handed to a statement: a server takes them as external data sent with the query;
  chdb has no external data, so they wait as files in the warehouse's own folder.
- Arrow inserts: clickhouse-connect's chdb backend writes them to a temporary file in the
  system's /tmp and leaves it there if the process is killed mid-insert, out of reach of
  an owner's erasure. Here they go through the warehouse's folder too, emptied at open.
- Writes: the embedded engine shares one process with the sink and the owner API; its
  writes run one at a time (as they always have; a server takes them side by side).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict
from urllib.parse import unquote, urlparse

import pyarrow as pa

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client
    from clickhouse_connect.driver.external import ExternalData


class WarehouseError(RuntimeError):
    """A statement failed in the warehouse, or the warehouse cannot be reached."""


class WarehouseBusy(WarehouseError):
    """The embedded warehouse folder is open in another process."""


@dataclass(frozen=True)
class Input:
    """Bytes a statement reads as a table, ``@name`` in its SQL."""

    data: bytes
    fmt: str  # a ClickHouse input format: Avro, ArrowStream, ...
    structure: str  # the columns, as ClickHouse's file() and external data take them


class Target(Protocol):
    description: str
    serial_writes: bool

    def client(self, settings: Mapping[str, str] | None = None) -> Client:
        """A new client, ``settings`` fixed on it for every statement it runs."""
        ...

    def with_inputs(
        self, sql: str, inputs: Mapping[str, Input]
    ) -> contextlib.AbstractContextManager[tuple[str, ExternalData | None]]:
        """``sql`` with each ``@name`` bound to its input, and the external data to send."""
        ...

    def with_settings(self, sql: str, settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``sql`` and the settings to hand the client with it (names and values that vtp
        checked)."""
        ...

    def insert_arrow(
        self, client: Client, table: str, data: pa.Table, settings: dict[str, Any]
    ) -> None:
        """``data`` into ``table``; ``settings`` are names and values vtp checked."""
        ...

    def close(self) -> None: ...


_INPUT = re.compile(r"@([a-z_][a-z0-9_]*)")


def bind_inputs(sql: str, sources: Mapping[str, str]) -> str:
    """``sql`` with each ``@name`` replaced by the table expression of that input."""
    named = set(_INPUT.findall(sql))
    if named != set(sources):
        raise WarehouseError(f"the statement names inputs {sorted(named)}, given {sorted(sources)}")
    return _INPUT.sub(lambda m: sources[m.group(1)], sql)


def settings_clause(settings: Mapping[str, Any]) -> str:
    """`` SETTINGS k = v, …`` for names and values vtp checked; empty for none."""
    if not settings:
        return ""
    return " SETTINGS " + ", ".join(
        f"{name} = {value if isinstance(value, int) else sql_string(value)}"
        for name, value in settings.items()
    )


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class EmbeddedEngine:
    """chdb in this process, one folder per region; only one process may open a folder."""

    serial_writes = True

    def __init__(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        if _locked_by_another_process(path / "status"):
            raise WarehouseBusy(
                f"the embedded warehouse {path} is open in another process (a running "
                "`vtp serve` or `vtp sink` for this region?); stop it first, ask the owner API, "
                "or point VTP_WAREHOUSE at a ClickHouse server"
            )
        self.path = path
        self.description = f"chdb:{path}"
        # Bytes handed to a statement wait here as files while it runs: inside the
        # warehouse's folder (they are its data), emptied when it opens and closes.
        self.inputs_folder = path / "vtp-inputs"
        shutil.rmtree(self.inputs_folder, ignore_errors=True)
        self.inputs_folder.mkdir()

    def client(self, settings: Mapping[str, str] | None = None) -> Client:
        import clickhouse_connect

        try:
            return clickhouse_connect.get_client(
                interface="chdb", path=str(self.path), settings=dict(settings or {})
            )
        except Exception as exc:
            raise WarehouseError(f"cannot open the embedded warehouse {self.path}: {exc}") from None

    @contextlib.contextmanager
    def with_inputs(
        self, sql: str, inputs: Mapping[str, Input]
    ) -> Iterator[tuple[str, ExternalData | None]]:
        with self._files({name: given.data for name, given in inputs.items()}) as paths:
            sources = {
                name: "file({})".format(
                    ", ".join(sql_string(x) for x in (paths[name], given.fmt, given.structure))
                )
                for name, given in inputs.items()
            }
            yield bind_inputs(sql, sources), None

    def insert_arrow(
        self, client: Client, table: str, data: pa.Table, settings: dict[str, Any]
    ) -> None:
        buffer = io.BytesIO()
        with pa.ipc.new_stream(buffer, data.schema) as writer:
            writer.write_table(data)
        columns = ", ".join(f"`{name}`" for name in data.column_names)
        with self._files({"rows": buffer.getvalue()}) as paths:
            client.command(
                f"INSERT INTO {table} ({columns}) FROM INFILE {sql_string(paths['rows'])}"
                f"{settings_clause(settings)} FORMAT ArrowStream"
            )

    def with_settings(self, sql: str, settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # As a clause (as the chdb backend's own file inserts do): handed to the client,
        # each setting costs a SET before and one after the statement (measured: 6.0 ms
        # for the sink's samples insert, 2.1 ms with the clause).
        return sql + settings_clause(settings), {}

    @contextlib.contextmanager
    def _files(self, contents: Mapping[str, bytes]) -> Iterator[dict[str, str]]:
        """Each content in a private file of the inputs folder, gone with the statement."""
        paths: dict[str, str] = {}
        try:
            for name, data in contents.items():
                handle, paths[name] = tempfile.mkstemp(dir=self.inputs_folder)
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
            yield paths
        finally:
            for path in paths.values():
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def close(self) -> None:
        shutil.rmtree(self.inputs_folder, ignore_errors=True)


class _ClientArgs(TypedDict, total=False):
    """The arguments of clickhouse_connect.get_client that vtp passes a server."""

    host: str | None
    port: int
    username: str
    password: str
    secure: bool
    database: str


class ClickHouseServer:
    """A ClickHouse server over HTTP(S); the region's own database on it."""

    serial_writes = False

    def __init__(self, url: str, region: str, session: Mapping[str, str] | None = None):
        self._session = dict(session or {})  # settings every client carries
        parsed = urlparse(url.replace("{region}", region))
        database = server_database(url, region)
        self.description = f"{parsed.scheme}://{parsed.hostname}:{parsed.port}/{database}"
        self._connect: _ClientArgs = {
            "host": parsed.hostname,
            "port": parsed.port or (8443 if parsed.scheme == "https" else 8123),
            "username": unquote(parsed.username or "default"),
            "password": unquote(parsed.password or ""),
            "secure": parsed.scheme == "https",
        }
        admin = self.client()
        try:
            admin.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        except Exception as exc:
            raise WarehouseError(f"cannot reach ClickHouse at {self.description}: {exc}") from None
        finally:
            admin.close()
        self._connect["database"] = database

    def client(self, settings: Mapping[str, str] | None = None) -> Client:
        import clickhouse_connect

        try:
            return clickhouse_connect.get_client(
                **self._connect, settings={**self._session, **(settings or {})}
            )
        except Exception as exc:
            raise WarehouseError(f"cannot reach ClickHouse at {self.description}: {exc}") from None

    @contextlib.contextmanager
    def with_inputs(
        self, sql: str, inputs: Mapping[str, Input]
    ) -> Iterator[tuple[str, ExternalData | None]]:
        from clickhouse_connect.driver.external import ExternalData

        external = ExternalData()
        for name, given in inputs.items():
            external.add_file(
                file_name=name, data=given.data, fmt=given.fmt, structure=given.structure
            )
        yield bind_inputs(sql, {name: name for name in inputs}), external

    def with_settings(self, sql: str, settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return sql, settings  # sent with the request

    def insert_arrow(
        self, client: Client, table: str, data: pa.Table, settings: dict[str, Any]
    ) -> None:
        client.insert_arrow(table, data, settings=settings)

    def close(self) -> None:
        pass


def server_database(url: str, region: str) -> str:
    """The region's database on the server ``url`` names (``{region}`` filled in)."""
    database = urlparse(url.replace("{region}", region)).path.strip("/") or f"vtp_{region}"
    if region not in database:
        raise WarehouseError(
            f"the warehouse database {database!r} is not the region's own: name it after "
            "the region, e.g. VTP_WAREHOUSE=http://user:pass@host:8123/vtp_{region}"
        )
    return database


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

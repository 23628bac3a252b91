"""The migration lock on the real engine: two migrators at once apply each version once;
a held lock makes the second wait, then fail naming the holder; a stale or orphaned lock is
broken; a failed migration lets go of it."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import clickhouse_connect
import pyarrow as pa
import pytest

from sinks.migration_lock import Holder, MigrationLockTimeout, migration_lock, pid_space
from sinks.migrations import MigrationOptions, available, migrate
from vtp.core.cluster_ddl import LOCK_TABLE, lock_create
from vtp.core.warehouse import ChdbWarehouse, WarehouseError, rows


class Connection:
    """A warehouse on a client of its own on the engine: its statements run beside another
    client's, with no pool or lock of ChdbWarehouse's between them."""

    description = "chdb connection"

    def __init__(self, path: Path, before: Any = None, refused: Any = None):
        self._client = clickhouse_connect.get_client(interface="chdb", path=str(path))
        self._before = before  # called with each statement before it runs
        self._refused = refused  # called when this connection is refused the lock

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        if self._before:
            self._before(self, sql)
        try:
            self._client.command(sql, parameters=params or None)
        except Exception as exc:
            if self._refused and sql.startswith(f"CREATE TABLE {LOCK_TABLE} "):
                self._refused()
            raise WarehouseError(str(exc)) from None

    def query(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        try:
            return self._client.query_arrow(sql, parameters=params or None)
        except Exception as exc:
            raise WarehouseError(str(exc)) from None

    def close(self) -> None:
        self._client.close()


def tables(warehouse) -> set[str]:
    found = warehouse.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    return {r[0] for r in rows(found)}


def migrate_at_once(connections: list[Connection]) -> list[list[int]]:
    """Each connection migrates in a thread of its own, all starting together; what each
    applied, in the order of ``connections``."""
    results: list[list[int]] = [[] for _ in connections]
    errors: list[BaseException] = []
    start = threading.Barrier(len(connections))

    def run(index: int, connection: Connection) -> None:
        try:
            start.wait()
            results[index] = migrate(connection, options=MigrationOptions(lock_timeout_s=120))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_two_migrators_at_once_apply_each_version_once_and_one_waits(tmp_path):
    """Whoever takes the lock pauses until the other has been refused it, so the two
    really overlap, whichever thread is faster."""
    path = tmp_path / "wh"
    refused = threading.Event()
    holder_paused = []

    def before(connection: Connection, sql: str) -> None:
        if sql.startswith("CREATE TABLE IF NOT EXISTS schema_migrations") and not holder_paused:
            holder_paused.append(connection)
            assert refused.wait(60), "the other migrator was never refused the lock"

    first, second = (Connection(path, before, refused.set) for _ in range(2))
    results = migrate_at_once([first, second])
    everything = [v for v, _, _ in available()]
    assert sorted(results) == [[], everything]  # one applied all, the other waited
    assert refused.is_set()
    found = rows(first.query("SELECT version, count() FROM schema_migrations GROUP BY version"))
    assert sorted(found) == [(v, 1) for v in everything]
    assert not {t for t in tables(first) if t.startswith(LOCK_TABLE)}
    first.close()
    second.close()


def test_many_migrators_racing_freely_apply_each_version_once(tmp_path):
    connections = [Connection(tmp_path / "wh") for _ in range(4)]
    results = migrate_at_once(connections)
    everything = [v for v, _, _ in available()]
    assert sorted(results) == [[], [], [], everything]
    found = rows(connections[0].query("SELECT version FROM schema_migrations ORDER BY version"))
    assert [v for (v,) in found] == everything
    for c in connections:
        c.close()


@pytest.fixture
def warehouse(tmp_path):
    wh = ChdbWarehouse(tmp_path / "wh")
    yield wh
    wh.close()


def hold(warehouse, holder: Holder) -> None:
    warehouse.execute(lock_create(holder.comment(), ""))


def test_a_held_lock_fails_the_second_migration_naming_the_holder(warehouse):
    hold(warehouse, Holder("other-host", 4242, time.time(), "t"))
    with pytest.raises(MigrationLockTimeout, match="other-host pid 4242"):
        migrate(warehouse, options=MigrationOptions(lock_timeout_s=0))
    assert "schema_migrations" not in tables(warehouse)  # nothing ran
    assert LOCK_TABLE in tables(warehouse)  # and the holder's lock is still its own


def test_a_waiter_retries_until_its_timeout(warehouse):
    hold(warehouse, Holder("other-host", 4242, 1_000_000.0, "t"))
    clock = [1_000_000.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    lock = migration_lock(warehouse, "", 10, 600, poll_s=1, clock=lambda: clock[0], sleep=sleep)
    with pytest.raises(MigrationLockTimeout, match="other-host"), lock:
        pytest.fail("the lock was taken while another held it")
    assert slept == [1] * 10


def test_a_stale_lock_is_broken_with_a_warning(warehouse, caplog):
    hold(warehouse, Holder("other-host", 4242, time.time() - 3600, "t"))
    with caplog.at_level(logging.WARNING, "vtp.migrations"):
        applied = migrate(warehouse, options=MigrationOptions(lock_timeout_s=0, lock_stale_s=600))
    assert applied == [v for v, _, _ in available()]
    assert "broke the migration lock of other-host pid 4242" in caplog.text
    assert not {t for t in tables(warehouse) if t.startswith(LOCK_TABLE)}


def test_the_lock_of_a_process_gone_from_this_host_is_broken_at_once(warehouse, caplog):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    here = socket.gethostname(), int(gone.stdout)
    hold(warehouse, Holder(*here, time.time(), "t", pid_space()))
    with caplog.at_level(logging.WARNING, "vtp.migrations"):
        assert migrate(warehouse, options=MigrationOptions(lock_timeout_s=0))
    assert f"process {int(gone.stdout)} is gone from this host" in caplog.text


def test_a_pid_from_another_pid_namespace_is_not_taken_for_one_of_ours(warehouse):
    # Two containers with one host name: the other's pid 1 is not our pid 1, alive or not.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    elsewhere = Holder(socket.gethostname(), int(gone.stdout), time.time(), "t", "other-boot/1")
    hold(warehouse, elsewhere)
    with pytest.raises(MigrationLockTimeout, match=f"pid {int(gone.stdout)}"):
        migrate(warehouse, options=MigrationOptions(lock_timeout_s=0))


def test_a_lock_this_process_left_in_an_earlier_attempt_is_taken_back(warehouse, caplog):
    # e.g. its create answered with a timeout on a cluster but happened all the same.
    hold(warehouse, Holder(socket.gethostname(), os.getpid(), time.time(), "old", pid_space()))
    with caplog.at_level(logging.WARNING, "vtp.migrations"):
        assert migrate(warehouse, options=MigrationOptions(lock_timeout_s=0))
    assert "earlier attempt" in caplog.text
    assert LOCK_TABLE not in tables(warehouse)


def test_nothing_pending_takes_no_lock(warehouse):
    migrate(warehouse)
    hold(warehouse, Holder("other-host", 4242, time.time(), "t"))  # someone is migrating
    assert migrate(warehouse, options=MigrationOptions(lock_timeout_s=0)) == []


def test_a_failed_migration_lets_go_of_the_lock(warehouse, tmp_path):
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_fine.sql").write_text(
        "CREATE TABLE IF NOT EXISTS a (x UInt8) ENGINE = MergeTree ORDER BY x;\n"
    )
    (folder / "0002_broken.sql").write_text("CREATE TABLE b (x UInt8) ENGINE = NoSuchEngine;\n")
    with pytest.raises(WarehouseError, match="NoSuchEngine"):
        migrate(warehouse, folder)
    assert LOCK_TABLE not in tables(warehouse)
    assert rows(warehouse.query("SELECT version FROM schema_migrations")) == [(1,)]
    (folder / "0002_broken.sql").write_text("CREATE TABLE b (x UInt8) ENGINE = Memory;\n")
    assert migrate(warehouse, folder) == [2]  # the next run takes the lock and goes on


def test_a_lock_someone_broke_is_not_dropped_on_release(warehouse, caplog):
    with caplog.at_level(logging.WARNING, "vtp.migrations"), migration_lock(warehouse, "", 0, 600):
        warehouse.execute(f"DROP TABLE {LOCK_TABLE} SYNC")
        hold(warehouse, Holder("newcomer", 7, time.time(), "n"))
    assert LOCK_TABLE in tables(warehouse)
    assert "no longer ours" in caplog.text

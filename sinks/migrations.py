"""Versioned DDL: files NNNN_name.sql in sinks/migrations, applied once each, in order.

Written for one server; on a cluster (VTP_WAREHOUSE_CLUSTER) each statement is rendered
for it by vtp.core.cluster_ddl. One process migrates at a time (sinks.migration_lock).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sinks.migration_lock import migration_lock
from vtp.core.cluster_ddl import bookkeeping_ddl, bookkeeping_sync, render_migration
from vtp.core.settings import Settings
from vtp.core.warehouse import Warehouse, WarehouseError, rows
from vtp.core.warehouse_targets import server_database

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class MigrationOptions:
    """Where the migrations run and how long one waits for another's."""

    cluster: str = ""  # empty: a single server (or the embedded engine)
    database: str = ""  # the region's database on the cluster's servers
    lock_timeout_s: float = 900.0
    lock_stale_s: float = 600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> MigrationOptions:
        cluster = settings.warehouse_cluster
        return cls(
            cluster,
            server_database(settings.warehouse, settings.need_region()) if cluster else "",
            settings.migration_lock_timeout_s,
            settings.migration_lock_stale_s,
        )


# One server, the default lock times: what tests and tools without settings migrate with.
DEFAULT_OPTIONS = MigrationOptions()


def statements(text: str) -> list[str]:
    """Split a migration into statements on ';' at line ends; '--' comments dropped."""
    lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
    parts = re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE)
    return [p.strip() for p in parts if p.strip()]


def available(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append((int(match.group(1)), match.group(2), path))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a version in {directory}")
    return found


def plan(
    cluster: str, directory: Path = MIGRATIONS_DIR, database: str = ""
) -> list[tuple[int, str, list[str]]]:
    """Every migration as the statements that would run for ``cluster`` (empty: one
    server) in ``database``; refuses, naming it, a statement with no cluster rendering."""
    return [
        (version, name, render_migration(statements(path.read_text()), cluster, database))
        for version, name, path in available(directory)
    ]


def _applied(warehouse: Warehouse) -> set[int]:
    return {row[0] for row in rows(warehouse.query("SELECT version FROM schema_migrations"))}


def _all_applied(warehouse: Warehouse, versions: list[int]) -> bool:
    """Whether every version is recorded already (versions are only ever added, so a
    replica that lags can only say no, and then the lock is taken to find out)."""
    try:
        return set(versions) <= _applied(warehouse)
    except WarehouseError:  # no bookkeeping yet: a fresh warehouse
        return False


def migrate(
    warehouse: Warehouse,
    directory: Path = MIGRATIONS_DIR,
    options: MigrationOptions = DEFAULT_OPTIONS,
) -> list[int]:
    """Apply pending migrations; returns the versions applied now."""
    cluster = options.cluster
    # A statement with no rendering fails here, before any runs.
    pending = plan(cluster, directory, options.database)
    if _all_applied(warehouse, [version for version, _, _ in pending]):
        return []  # every process starting up would otherwise queue for the lock
    with migration_lock(
        warehouse, cluster, options.lock_timeout_s, options.lock_stale_s
    ) as progress:
        warehouse.execute(bookkeeping_ddl(cluster))
        for statement in bookkeeping_sync(cluster):
            warehouse.execute(statement)
        done = _applied(warehouse)
        applied = []
        for version, name, rendered in pending:
            if version in done:
                continue
            for statement in rendered:
                warehouse.execute(statement)
                progress()
            warehouse.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ({v:UInt32}, {n:String})",
                {"v": version, "n": name},
            )
            applied.append(version)
    return applied

"""The warehouse's DDL for a ClickHouse cluster, rendered from the single-server DDL.

A migration is written once, for one server (sinks/migrations/*.sql). With
``VTP_WAREHOUSE_CLUSTER`` set, each of its statements is rendered here for that cluster:

- a table ``t`` becomes ``t_local`` on every node (ReplicatedMergeTree or
  ReplicatedReplacingMergeTree, with a deduplication window) and ``t`` a Distributed table
  over them, sharded by the key listed in SHARD_KEYS;
- views, drops and alters run ``ON CLUSTER``; an alter of a table's data or TTL runs on
  ``t_local``, an added column on both;
- inserts go through the Distributed table as written.

What is not recognised is refused, naming the statement: the renderer is an allow-list, so
a migration it does not understand fails in the tests, not half-applied on a cluster.
Everything here is pure: text in, text out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vtp.core.warehouse_targets import sql_string

LOCAL_SUFFIX = "_local"

# The inserts' deduplication window on a replicated table. The sink makes its inserts
# idempotent with insert_deduplication_token and relies on the last 10000 tokens being
# remembered (what every single-server table with a window has); tables that have no
# window on one server get the same, so no table on a cluster remembers less.
DEDUPLICATION_WINDOW = 10_000

# How each table's rows are spread over the shards: an allow-list, so a new table is
# refused on a cluster until someone decides how it shards. The rule: rows that
# ReplacingMergeTree collapses (the same sorting key) must be on the same shard, or
# SELECT … FINAL through the Distributed table returns both. So: the vehicle where the
# sorting key has it, else the owner. The key is a function of the row, never rand():
# a retried insert must split over the shards exactly as the first one did, or the
# shards' deduplication tokens would not match.
SHARD_KEYS: dict[str, tuple[str, ...]] = {
    "samples": ("vin",),
    "uploads": ("vin",),
    "trips": ("vin",),
    "charges": ("vin",),
    "daily_summaries": ("vin",),
    "open_sessions": ("vin",),
    "pseudonyms": ("vin",),  # beside the vehicle's samples, for the analyst views' joins
    "grants": ("owner_id",),
    "audit_log": ("owner_id",),
    "erasures": ("owner_id",),
    # The sink's batch log: neither vehicle nor owner; one Kafka partition's log together.
    "sink_batches": ("topic", "partition"),
    # One row (the key of 0004, dropped by 0005): any shard holds it whole.
    "pseudonym_key": ("key",),
}

# Tables every node keeps whole (replicated to all nodes, not sharded): what every
# node must agree on. The replica name joins shard and replica, unique in the cluster.
BOOKKEEPING_TABLE = "schema_migrations"
LOCK_TABLE = "vtp_migration_lock"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REPLICATED = {
    "MergeTree": "ReplicatedMergeTree",
    "ReplacingMergeTree": "ReplicatedReplacingMergeTree",
}
_COLLAPSING = {"ReplacingMergeTree"}


class ClusterDDLError(ValueError):
    """A statement or name the cluster rendering does not accept."""


def check_cluster_name(name: str) -> str:
    """``name`` if it is a ClickHouse identifier (it is written into SQL as is)."""
    if not _IDENTIFIER.fullmatch(name):
        raise ClusterDDLError(
            f"cluster name {name!r} is not a ClickHouse identifier ([A-Za-z_][A-Za-z0-9_]*): "
            "use the name of a <remote_servers> entry of the server's configuration"
        )
    return name


def _table_name(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ClusterDDLError(f"table name {name!r} is not a ClickHouse identifier")
    return name


def local_table(name: str, cluster: str) -> str:
    """The table that holds ``name``'s rows on one node: itself on a single server,
    ``name_local`` on a cluster (``name`` is then the Distributed table over them)."""
    return f"{name}{LOCAL_SUFFIX}" if cluster else name


def on_cluster(cluster: str) -> str:
    """`` ON CLUSTER c`` on a cluster, nothing on a single server."""
    return f" ON CLUSTER {check_cluster_name(cluster)}" if cluster else ""


def replica_path(table: str) -> str:
    """A sharded table's Keeper path: one replica set per shard and database."""
    return f"/clickhouse/tables/{{shard}}/{{database}}/{table}"


def bookkeeping_ddl(cluster: str) -> str:
    """schema_migrations: on a cluster replicated to every node (no {shard} in its path),
    so any node answers what ran."""
    columns = "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))"
    if not cluster:
        return f"CREATE TABLE IF NOT EXISTS {BOOKKEEPING_TABLE} {columns} ENGINE = MergeTree ORDER BY version"
    path = f"/clickhouse/tables/all/{{database}}/{BOOKKEEPING_TABLE}"
    return (
        f"CREATE TABLE IF NOT EXISTS {BOOKKEEPING_TABLE}{on_cluster(cluster)} {columns} "
        f"ENGINE = ReplicatedMergeTree('{path}', '{{shard}}-{{replica}}') ORDER BY version"
    )


def bookkeeping_sync(cluster: str) -> list[str]:
    """What runs before schema_migrations is read: on a cluster this node first fetches
    what other nodes inserted (a migration another node finished a moment ago)."""
    return [f"SYSTEM SYNC REPLICA {BOOKKEEPING_TABLE}"] if cluster else []


# -- the migration lock's statements (sinks/migration_lock.py runs them) ---------------


def lock_create(comment: str, cluster: str) -> str:
    """Take the lock: no IF NOT EXISTS, so a second creator gets TABLE_ALREADY_EXISTS.
    ON CLUSTER, creates are queued in Keeper and run in one order on every node: the
    first queued wins everywhere."""
    return (
        f"CREATE TABLE {LOCK_TABLE}{on_cluster(cluster)} (holder String) ENGINE = Memory "
        f"COMMENT {sql_string(comment)}"
    )


def lock_touch(comment: str, cluster: str) -> str:
    return f"ALTER TABLE {LOCK_TABLE}{on_cluster(cluster)} MODIFY COMMENT {sql_string(comment)}"


def lock_rename(to: str, cluster: str, source: str = LOCK_TABLE) -> str:
    return f"RENAME TABLE {_table_name(source)} TO {_table_name(to)}{on_cluster(cluster)}"


def lock_drop(cluster: str, table: str = LOCK_TABLE) -> str:
    return f"DROP TABLE IF EXISTS {_table_name(table)}{on_cluster(cluster)} SYNC"


# -- migrations --------------------------------------------------------------------------


@dataclass(frozen=True)
class _CreateTable:
    name: str
    columns: str
    engine: str
    args: str
    rest: str


_CREATE_TABLE = re.compile(
    r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<name>\w+)\s*(?P<columns>\(.*\))\s*"
    r"ENGINE\s*=\s*(?P<engine>\w+)(?:\((?P<args>[^()]*)\))?(?P<rest>.*)",
    re.S | re.I,
)
_CREATE_VIEW = re.compile(
    r"(?P<head>CREATE\s+VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?\w+)(?P<body>\s+AS\s.*)", re.S | re.I
)
_DROP_VIEW = re.compile(r"DROP\s+VIEW\s+(?:IF\s+EXISTS\s+)?\w+", re.I)
_DROP_TABLE = re.compile(
    r"DROP\s+TABLE\s+(?P<if>IF\s+EXISTS\s+)?(?P<name>\w+)(?P<sync>\s+SYNC)?", re.I
)
_ALTER = re.compile(
    r"ALTER\s+TABLE\s+(?P<name>\w+)\s+(?P<command>MODIFY\s+TTL|ADD\s+COLUMN)\b(?P<rest>.*)",
    re.S | re.I,
)
_OTHER_COMMAND = re.compile(
    r",\s*(ADD|DROP|MODIFY|RENAME|CLEAR|UPDATE|DELETE|MATERIALIZE|COMMENT|FREEZE|ATTACH|DETACH|MOVE|REPLACE)\b",
    re.I,
)
_INSERT = re.compile(r"INSERT\s+INTO\s+\w+\b", re.I)
_ORDER_BY = re.compile(r"\bORDER\s+BY\s+(?P<key>\([^()]*\)|\w+\(\)|\w+)", re.I)


def render_statement(sql: str, cluster: str, database: str = "") -> list[str]:
    """The statements that do on ``cluster`` what ``sql`` does on one server, in the
    region's ``database``; on a single server (``cluster`` empty), ``sql`` itself."""
    if not cluster:
        return [sql]
    check_cluster_name(cluster)
    text = sql.strip()
    if match := _CREATE_TABLE.fullmatch(text):
        try:
            table = _CreateTable(**match.groupdict(default=""))
            return _create_table(table, cluster, _database_name(database))
        except ClusterDDLError as exc:
            raise ClusterDDLError(f"{exc}\n-- in: {_head(text)}") from None
    if match := _CREATE_VIEW.fullmatch(text):
        return [f"{match['head']}{on_cluster(cluster)}{match['body']}"]
    if _DROP_VIEW.fullmatch(text):
        return [text + on_cluster(cluster)]
    if match := _DROP_TABLE.fullmatch(text):
        head = f"DROP TABLE {'IF EXISTS ' if match['if'] else ''}"
        sync = " SYNC" if match["sync"] else ""
        # The Distributed table first: nothing reads through it into a dropped table.
        return [
            f"{head}{name}{on_cluster(cluster)}{sync}"
            for name in (match["name"], local_table(match["name"], cluster))
        ]
    if match := _ALTER.fullmatch(text):
        return _alter(match["name"], match["command"], match["rest"], cluster, text)
    if _INSERT.match(text):
        return [text]  # through the Distributed table, which shards the rows
    raise ClusterDDLError(f"no cluster rendering for this statement: {_head(text)}")


def render_migration(statements: list[str], cluster: str, database: str = "") -> list[str]:
    return [out for sql in statements for out in render_statement(sql, cluster, database)]


def _database_name(database: str) -> str:
    # Named, never currentDatabase() or an unqualified AS: each node runs ON CLUSTER DDL in
    # its DDL worker's default database, not the session's (ClickHouse issues 6104, 37318).
    if not database:
        raise ClusterDDLError("a table on a cluster needs the region's database named")
    return _table_name(database)


def _create_table(table: _CreateTable, cluster: str, database: str) -> list[str]:
    name = table.name
    replicated = _REPLICATED.get(table.engine)
    if replicated is None:
        raise ClusterDDLError(
            f"table {name}: engine {table.engine} has no cluster rendering "
            f"(known: {', '.join(_REPLICATED)})"
        )
    if re.search(r"\bCOMMENT\b", table.rest, re.I):
        raise ClusterDDLError(f"table {name}: a COMMENT after the engine is not rendered yet")
    shard_columns = SHARD_KEYS.get(name)
    if shard_columns is None:
        raise ClusterDDLError(
            f"table {name} has no shard key: add it to SHARD_KEYS in {__name__} "
            "(the columns whose rows must be on one shard) before it can run on a cluster"
        )
    if table.engine in _COLLAPSING:
        missing = set(shard_columns) - set(sorting_key(table.rest))
        if missing:
            raise ClusterDDLError(
                f"table {name}: shard key column(s) {sorted(missing)} are not in its ORDER BY, "
                "so rows FINAL must collapse could land on different shards"
            )
    local = local_table(name, cluster)
    args = ", ".join(
        a for a in (f"'{replica_path(local)}'", "'{replica}'", table.args.strip()) if a
    )
    local_ddl = (
        f"CREATE TABLE IF NOT EXISTS {local}{on_cluster(cluster)}\n{table.columns}\n"
        f"ENGINE = {replicated}({args}){_with_replicated_window(table.rest)}"
    )
    key = f"cityHash64({', '.join(shard_columns)})"
    distributed_ddl = (
        f"CREATE TABLE IF NOT EXISTS {name}{on_cluster(cluster)} AS {database}.{local} "
        f"ENGINE = Distributed({cluster}, {database}, {local}, {key})"
    )
    return [local_ddl, distributed_ddl]


def sorting_key(storage: str) -> list[str]:
    """The columns of the ORDER BY in a table's storage clauses (empty: ``tuple()``)."""
    match = _ORDER_BY.search(storage)
    if match is None:
        return []
    key = match["key"].strip("()")
    return [] if key.endswith("tuple") or not key else [c.strip() for c in key.split(",")]


def _with_replicated_window(rest: str) -> str:
    """The storage clauses with the replicated deduplication window in place of the
    non-replicated one (or added)."""
    # The same number of inserts remembered as on one server, now in Keeper.
    replaced, found = re.subn(
        r"\bnon_replicated_deduplication_window\b", "replicated_deduplication_window", rest
    )
    if found:
        return replaced
    setting = f"replicated_deduplication_window = {DEDUPLICATION_WINDOW}"
    if re.search(r"\bSETTINGS\b", rest, re.I):
        return f"{rest.rstrip()}, {setting}"
    return f"{rest.rstrip()}\nSETTINGS {setting}"


def _alter(name: str, command: str, rest: str, cluster: str, text: str) -> list[str]:
    kind = " ".join(command.upper().split())
    others = [m[1].upper() for m in _OTHER_COMMAND.finditer(rest)]
    if any(o != "ADD" for o in others) or (others and kind != "ADD COLUMN"):
        raise ClusterDDLError(f"one command per ALTER on a cluster, please: {_head(text)}")
    local = local_table(name, cluster)
    if kind == "MODIFY TTL":  # the data is in the local tables; a Distributed one has no TTL
        return [f"ALTER TABLE {local}{on_cluster(cluster)} {command}{rest}"]
    # A column added to the local tables only would not be seen through the Distributed
    # table: it gets the column too, after them.
    return [f"ALTER TABLE {t}{on_cluster(cluster)} {command}{rest}" for t in (local, name)]


def _head(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 120 else line[:117] + "..."

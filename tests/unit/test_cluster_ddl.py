"""The cluster rendering of the migrations, as text: pure, no engine (the engine's reading
of the same statements: tests/integration/test_cluster_ddl_parsed.py)."""

import pytest

from sinks.migrations import available, plan, statements
from vtp.core.cluster_ddl import (
    SHARD_KEYS,
    ClusterDDLError,
    bookkeeping_ddl,
    bookkeeping_sync,
    check_cluster_name,
    local_table,
    on_cluster,
    render_statement,
    sorting_key,
)

# What migrate ran before clusters existed, byte for byte.
SINGLE_SERVER_BOOKKEEPING = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
    "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = MergeTree ORDER BY version"
)


def test_a_single_server_runs_every_statement_exactly_as_written():
    for (version, _, path), (planned_version, _, rendered) in zip(
        available(), plan(""), strict=True
    ):
        assert planned_version == version
        assert rendered == statements(path.read_text())
    assert bookkeeping_ddl("") == SINGLE_SERVER_BOOKKEEPING
    assert bookkeeping_sync("") == []
    assert local_table("samples", "") == "samples" and on_cluster("") == ""


def test_every_migration_renders_for_a_cluster():
    rendered = [s for _, _, out in plan("vtp_cluster", database="vtp_eu") for s in out]
    assert len(rendered) > sum(len(statements(p.read_text())) for _, _, p in available())
    assert all("vtp_cluster" in s or s.startswith("INSERT") for s in rendered)


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "c;DROP", "é"])
def test_a_cluster_name_must_be_an_identifier(name):
    with pytest.raises(ClusterDDLError):
        check_cluster_name(name)


def test_a_table_without_a_shard_key_is_refused_on_a_cluster():
    sql = "CREATE TABLE IF NOT EXISTS new_table (x String) ENGINE = MergeTree ORDER BY x"
    assert render_statement(sql, "") == [sql]  # one server: as before
    with pytest.raises(ClusterDDLError, match=r"new_table has no shard key.*SHARD_KEYS"):
        render_statement(sql, "c", "vtp_eu")


def test_a_replacing_table_must_shard_by_columns_of_its_sorting_key(monkeypatch):
    monkeypatch.setitem(SHARD_KEYS, "versions", ("vin",))
    sql = (
        "CREATE TABLE versions (owner_id String, v UInt64) "
        "ENGINE = ReplacingMergeTree(v) ORDER BY (owner_id)"
    )
    with pytest.raises(ClusterDDLError, match=r"\['vin'\].*ORDER BY"):
        render_statement(sql, "c", "vtp_eu")


def test_every_shard_key_of_a_replacing_table_is_in_its_sorting_key():
    """The rule FINAL through a Distributed table needs, checked on the real files."""
    for _, _, path in available():
        for sql in statements(path.read_text()):
            if "ReplacingMergeTree" in sql:
                name = sql.split("(")[0].split()[-1]
                assert set(SHARD_KEYS[name]) <= set(sorting_key(sql.split("ENGINE")[1])), name


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE t (x String) ENGINE = Log",
        "CREATE MATERIALIZED VIEW mv TO t AS SELECT 1",
        "ALTER TABLE samples DELETE WHERE 1",
        "ALTER TABLE samples MODIFY TTL toDateTime(received_at) + INTERVAL 1 DAY, DROP COLUMN gear",
        "TRUNCATE TABLE samples",
        "RENAME TABLE a TO b",
        "SELECT 1",
    ],
)
def test_a_statement_without_a_cluster_rendering_is_refused_by_name(sql):
    with pytest.raises(ClusterDDLError) as refused:
        render_statement(sql, "c")
    assert sql.split()[0] in str(refused.value)


def test_the_dedup_window_becomes_the_replicated_one_or_is_added():
    windowed = (
        "CREATE TABLE samples (vin String) ENGINE = MergeTree ORDER BY vin "
        "SETTINGS non_replicated_deduplication_window = 777"
    )
    local, _ = render_statement(windowed, "c", "vtp_eu")
    assert local.endswith("SETTINGS replicated_deduplication_window = 777")
    bare = "CREATE TABLE grants (owner_id String) ENGINE = MergeTree ORDER BY owner_id"
    local, _ = render_statement(bare, "c", "vtp_eu")
    assert local.endswith("SETTINGS replicated_deduplication_window = 10000")


def test_a_table_on_a_cluster_needs_the_database_named():
    sql = "CREATE TABLE grants (owner_id String) ENGINE = MergeTree ORDER BY owner_id"
    with pytest.raises(ClusterDDLError, match="database named"):
        render_statement(sql, "c")
    with pytest.raises(ClusterDDLError, match="not a ClickHouse identifier"):
        render_statement(sql, "c", "vtp_eu; DROP")

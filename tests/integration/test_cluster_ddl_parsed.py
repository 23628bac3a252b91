"""The cluster DDL as the ClickHouse engine reads it. No cluster runs here (no server, no
Keeper), but the embedded engine parses ON CLUSTER DDL: every rendered statement goes
through its parser, and the checks read the engine's syntax tree (EXPLAIN AST) and its
own re-printing of the statement (formatQuerySingleLine), not our text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from owner_api.store import ERASED_TABLES, erase_statement
from sinks.migrations import plan
from vtp.core.cluster_ddl import (
    SHARD_KEYS,
    bookkeeping_ddl,
    bookkeeping_sync,
    lock_create,
    lock_drop,
    lock_rename,
    lock_touch,
)
from vtp.core.warehouse import ChdbWarehouse, rows

CLUSTER = "vtp_cluster"
DATABASE = "vtp_eu"


@dataclass
class Node:
    label: str
    children: list[Node] = field(default_factory=list)

    def find(self, prefix: str) -> Node | None:
        if self.label.startswith(prefix):
            return self
        for child in self.children:
            if (found := child.find(prefix)) is not None:
                return found
        return None


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    wh = ChdbWarehouse(tmp_path_factory.mktemp("parse") / "wh")
    yield wh
    wh.close()


def syntax_tree(engine: ChdbWarehouse, sql: str, params: dict | None = None) -> Node:
    lines = engine.analyst_lines("EXPLAIN AST " + sql, params, {})
    root = Node("root")
    stack: list[tuple[int, Node]] = [(-1, root)]
    for line in lines:
        depth = len(line) - len(line.lstrip(" "))
        node = Node(re.sub(r" \(children \d+\)$", "", line.strip()))
        while stack[-1][0] >= depth:
            stack.pop()
        stack[-1][1].children.append(node)
        stack.append((depth, node))
    return root.children[0]


def reprinted(engine: ChdbWarehouse, sql: str) -> str:
    """The statement as the engine prints it back after parsing it."""
    return rows(engine.query("SELECT formatQuerySingleLine({q:String})", {"q": sql}))[0][0]


def cluster_of(engine: ChdbWarehouse, sql: str) -> str | None:
    found = re.search(r" ON CLUSTER (\w+)", reprinted(engine, sql))
    return found[1] if found else None


def engine_call(tree: Node) -> tuple[str, list[str]]:
    """The ENGINE = F(args) of a CREATE's syntax tree: F and its arguments' labels."""
    storage = tree.find("Storage definition")
    assert storage is not None, tree
    function = storage.children[0]
    args = function.children[0].children if function.children else []
    return function.label.removeprefix("Function "), [a.label for a in args]


def cluster_statements() -> list[str]:
    return [s for _, _, rendered in plan(CLUSTER, database=DATABASE) for s in rendered]


def test_every_rendered_statement_parses_and_runs_on_the_cluster(engine):
    for sql in cluster_statements():
        tree = syntax_tree(engine, sql)  # raises on a syntax error
        if tree.label.startswith("InsertQuery"):
            assert cluster_of(engine, sql) is None  # through the Distributed table
        else:
            assert cluster_of(engine, sql) == CLUSTER, sql


def test_each_table_is_replicated_per_shard_behind_a_distributed_table(engine):
    creates = {}
    for sql in cluster_statements():
        tree = syntax_tree(engine, sql)
        if tree.label.startswith("CreateQuery") and tree.find("Storage definition"):
            creates[tree.label.split()[1]] = (tree, sql)
    tables = [n for n in creates if not n.endswith("_local")]
    assert set(tables) == set(SHARD_KEYS)
    for name in tables:
        local_tree, local_sql = creates[f"{name}_local"]
        function, args = engine_call(local_tree)
        assert function in ("ReplicatedMergeTree", "ReplicatedReplacingMergeTree")
        assert args[:2] == [
            f"Literal '/clickhouse/tables/{{shard}}/{{database}}/{name}_local'",
            "Literal '{replica}'",
        ]
        if function == "ReplicatedReplacingMergeTree" and name != "pseudonyms":
            assert args[2:] == ["Identifier version"]
        assert "replicated_deduplication_window = 10000" in reprinted(engine, local_sql)
        assert "non_replicated" not in reprinted(engine, local_sql)

        tree, sql = creates[name]
        function, args = engine_call(tree)
        assert function == "Distributed"
        assert args[:3] == [
            f"Identifier {CLUSTER}",
            f"Identifier {DATABASE}",  # named: each node's DDL worker has its own default
            f"Identifier {name}_local",
        ]
        key = tree.find("Storage definition").children[0].children[0].children[3]
        assert key.label == "Function cityHash64"
        assert [c.label for c in key.children[0].children] == [
            f"Identifier {c}" for c in SHARD_KEYS[name]
        ]
        assert f" AS {DATABASE}.{name}_local " in reprinted(
            engine, sql
        )  # the local table's columns


def test_alters_go_to_the_local_tables_and_added_columns_to_both(engine):
    alters = [
        (
            syntax_tree(engine, s).label.split()[-1],
            syntax_tree(engine, s).find("AlterCommand").label,
        )
        for s in cluster_statements()
        if s.startswith("ALTER")
    ]
    assert alters == [
        ("sink_batches_local", "AlterCommand MODIFY_TTL"),
        ("erasures_local", "AlterCommand MODIFY_TTL"),
        ("uploads_local", "AlterCommand ADD_COLUMN"),
        ("uploads", "AlterCommand ADD_COLUMN"),
    ]


def test_a_dropped_table_is_dropped_with_its_local_tables(engine):
    drops = [
        syntax_tree(engine, s).label for s in cluster_statements() if s.startswith("DROP TABLE")
    ]
    assert [d.split()[-1] for d in drops] == ["pseudonym_key", "pseudonym_key_local"]


def test_the_bookkeeping_is_replicated_to_every_node(engine):
    sql = bookkeeping_ddl(CLUSTER)
    function, args = engine_call(syntax_tree(engine, sql))
    assert (function, args) == (
        "ReplicatedMergeTree",
        [
            "Literal '/clickhouse/tables/all/{database}/schema_migrations'",
            "Literal '{shard}-{replica}'",
        ],
    )
    assert cluster_of(engine, sql) == CLUSTER
    for sql in bookkeeping_sync(CLUSTER):
        assert syntax_tree(engine, sql).label.startswith("SYSTEM query")


def test_the_lock_statements_parse_on_a_cluster(engine):
    create = lock_create('{"host": "it\'s"}', CLUSTER)
    assert engine_call(syntax_tree(engine, create))[0] == "Memory"
    assert 'COMMENT \'{"host": "it\\\'s"}\'' in reprinted(engine, create)
    for sql in (
        create,
        lock_touch("x", CLUSTER),
        lock_rename("aside", CLUSTER),
        lock_drop(CLUSTER),
    ):
        syntax_tree(engine, sql)
        assert cluster_of(engine, sql) == CLUSTER
    assert "IF NOT EXISTS" not in reprinted(engine, create)  # a second creator must fail


def test_an_erasure_on_a_cluster_mutates_each_shards_local_table(engine):
    for table in ERASED_TABLES:
        sql = erase_statement(table, CLUSTER)
        tree = syntax_tree(engine, sql, {"o": "owner-1"})
        assert tree.label.split()[-1] == f"{table}_local"
        assert tree.find("AlterCommand").label == "AlterCommand DELETE"
        assert cluster_of(engine, sql) == CLUSTER
        assert reprinted(engine, sql).endswith("SETTINGS mutations_sync = 2")
    single = erase_statement("samples")
    assert syntax_tree(engine, single, {"o": "o"}).label.split()[-1] == "samples"
    assert cluster_of(engine, single) is None

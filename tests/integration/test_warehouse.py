"""The real ClickHouse engine (chdb) behind the warehouse interface; no broker needed.
The server driver runs the same SQL when VTP_TEST_CLICKHOUSE_URL names a server."""

import os
import subprocess
import sys
import uuid

import pytest

from sinks.migrations import available, migrate, statements
from sinks.rows import StoredUpload, samples_table, uploads_table
from vtp.core.warehouse import ChdbWarehouse, ServerWarehouse, WarehouseBusy, WarehouseError, rows

SERVER_URL = os.environ.get("VTP_TEST_CLICKHOUSE_URL")


def upload(upload_id, months=(0,), samples=3):
    base = 1_790_000_000_000
    month = 31 * 86_400_000
    record = {
        "vin": "LRW3E7EK4NC000001",
        "upload_id": upload_id,
        "sent_at_ms": base,
        "gateway_firmware": "1",
        "samples": [
            {"event_time_ms": base + m * month + i * 1000, "seq": m * 100 + i, "speed": 1.0}
            for m in months
            for i in range(samples)
        ],
    }
    return StoredUpload(record, "owner-'quoted'", "cn", 1, base, "raw:0:1", "v.cn", 0, 1)


@pytest.fixture(params=["chdb", "server"])
def warehouse(request, tmp_path):
    if request.param == "server":
        if not SERVER_URL:
            pytest.skip(
                "no ClickHouse server: set VTP_TEST_CLICKHOUSE_URL=http://host:8123/db to run"
            )
        # A database of its own per run (dropped after), so a run never depends on what an
        # earlier one left and two runs never share one.
        url = SERVER_URL.rstrip("/") + f"_{uuid.uuid4().hex[:12]}_{{region}}"
        wh = ServerWarehouse(url, "test")
        yield wh
        wh.execute(f"DROP DATABASE IF EXISTS `{wh.description.rsplit('/', 1)[1]}` SYNC")
        wh.close()
        return
    wh = ChdbWarehouse(tmp_path / "wh")
    yield wh
    wh.close()


def test_migrations_apply_once(warehouse):
    first = migrate(warehouse)
    assert first == [v for v, _, _ in available()]
    assert migrate(warehouse) == []
    tables = {
        r[0]
        for r in rows(
            warehouse.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
        )
    }
    assert {"samples", "uploads", "sink_batches", "schema_migrations"} <= tables


def test_a_repeated_insert_with_the_same_token_is_dropped_even_across_partitions(warehouse):
    migrate(warehouse)
    batch = [upload("u-1", months=(0, 1, 2))]  # three monthly partitions, three parts
    for _ in range(3):
        warehouse.insert_arrow("samples", samples_table(batch), "v.cn-0-0-9")
        warehouse.insert_arrow("uploads", uploads_table(batch), "v.cn-0-0-9")
    assert rows(warehouse.query("SELECT count() FROM samples")) == [(9,)]
    assert rows(warehouse.query("SELECT count() FROM uploads")) == [(1,)]
    warehouse.insert_arrow("samples", samples_table(batch), "v.cn-0-10-19")  # another batch
    assert rows(warehouse.query("SELECT count() FROM samples")) == [(18,)]


def test_parameters_are_bound_not_formatted(warehouse):
    migrate(warehouse)
    warehouse.insert_arrow("samples", samples_table([upload("u-1")]), "t-0-0-0")
    owner = "owner-'quoted'"
    assert rows(
        warehouse.query("SELECT count() FROM samples WHERE owner_id = {o:String}", {"o": owner})
    ) == [(3,)]
    injected = "x' OR 1=1 --"
    assert rows(
        warehouse.query("SELECT count() FROM samples WHERE owner_id = {o:String}", {"o": injected})
    ) == [(0,)]
    ids = rows(
        warehouse.query(
            "SELECT count() FROM uploads WHERE upload_id IN {ids:Array(String)}",
            {"ids": ["u-1", "a'b"]},
        )
    )
    assert ids == [(0,)]  # no uploads row was inserted here, and the quote did no harm


def test_sql_errors_name_the_statement(warehouse):
    with pytest.raises(WarehouseError, match="no_such_table"):
        warehouse.query("SELECT * FROM no_such_table")


def test_unsafe_token_is_refused(tmp_path):
    wh = ChdbWarehouse(tmp_path / "wh")
    migrate(wh)
    with pytest.raises(ValueError, match="unsafe"):
        wh.insert_arrow("samples", samples_table([upload("u")]), "x'; DROP TABLE samples")
    wh.close()


def test_statement_splitting_ignores_comments():
    sql = "-- a; comment\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n\nSELECT 1;\n"
    assert statements(sql) == ["CREATE TABLE a (x UInt8) ENGINE = Memory", "SELECT 1"]


def test_a_second_process_gets_a_clear_busy_error(tmp_path):
    path = tmp_path / "wh"
    wh = ChdbWarehouse(path)
    try:
        code = (
            "import sys; from pathlib import Path; from vtp.core.warehouse import ChdbWarehouse, WarehouseBusy\n"
            f"try:\n    ChdbWarehouse(Path({str(path)!r}))\nexcept WarehouseBusy as e:\n    print(e); sys.exit(3)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 3, done.stderr
        assert "open in another process" in done.stdout
    finally:
        wh.close()
    assert WarehouseBusy.__mro__[1] is WarehouseError


def test_every_column_of_every_owner_table_is_opened_or_kept_inside_on_purpose(warehouse):
    """A new column stays closed until owner_api.scopes lists it: this fails until then."""
    from owner_api.scopes import EXPORT_COLUMNS, INTERNAL_COLUMNS, ROUTE_COLUMNS

    migrate(warehouse)
    for table, exported in EXPORT_COLUMNS.items():
        found = [
            c
            for (c,) in rows(
                warehouse.query(
                    "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}",
                    {"t": table},
                )
            )
        ]
        declared = set(exported) | set(INTERNAL_COLUMNS[table])
        assert set(found) == declared, (table, set(found) ^ declared)
        assert not set(exported) & set(INTERNAL_COLUMNS[table]), table
    for table, columns in ROUTE_COLUMNS.items():
        assert set(columns) <= set(EXPORT_COLUMNS[table]), table


def test_a_failed_statement_leaves_nothing_in_the_next_answer(tmp_path):
    # chdb 4.4 hands a failed statement's partial output to the next statement on the same
    # connection (another request's answer would start with it) unless it is read away.
    wh = ChdbWarehouse(tmp_path / "wh", readers=1)  # the next read is on the same connection
    try:
        with pytest.raises(WarehouseError, match="TIMEOUT"):
            wh.query(
                "SELECT 'partial' AS x UNION ALL SELECT toString(sum(sipHash64(number))) "
                "FROM numbers(1e11) SETTINGS max_execution_time = 1"
            )
        assert rows(wh.query("SELECT 42 AS answer")) == [(42,)]
        assert wh.query_raw("SELECT 43", None, "CSV") == b"43\n"
    finally:
        wh.close()


def test_concurrent_reads_on_several_connections_each_get_their_own_answer(tmp_path):
    import threading

    wh = ChdbWarehouse(tmp_path / "wh", readers=4)
    wrong: list[tuple[int, object]] = []
    try:

        def reads(worker: int) -> None:
            for i in range(40):
                mine = (worker * 1000 + i, f"w{worker}'{i}")
                found = rows(
                    wh.query("SELECT {n:UInt32}, {s:String}", {"n": mine[0], "s": mine[1]})
                )
                if found != [mine]:
                    wrong.append((worker, found))

        threads = [threading.Thread(target=reads, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wrong == []
    finally:
        wh.close()


def test_a_read_is_answered_while_a_write_runs(tmp_path):
    import threading
    import time

    wh = ChdbWarehouse(tmp_path / "wh")
    try:
        wh.execute("CREATE TABLE slow (n UInt64) ENGINE = MergeTree ORDER BY n")
        insert = (
            "INSERT INTO slow SELECT sleepEachRow(1) + number FROM numbers(5) "
            "SETTINGS max_block_size = 1"
        )
        writing = threading.Thread(target=wh.execute, args=(insert,))
        writing.start()
        time.sleep(0.5)  # the insert holds the write connection for about 5 s
        assert rows(wh.query("SELECT count() FROM slow")) == [(0,)]
        assert writing.is_alive()  # answered beside the write, not after it
        writing.join()
        assert rows(wh.query("SELECT count() FROM slow")) == [(5,)]
    finally:
        wh.close()


def test_closing_while_a_read_runs_lets_it_finish_and_refuses_later_reads(tmp_path):
    import threading
    import time

    wh = ChdbWarehouse(tmp_path / "wh", readers=1)
    answers: list[object] = []
    reading = threading.Thread(
        target=lambda: answers.append(rows(wh.query("SELECT sleepEachRow(1) + 7 FROM numbers(2)")))
    )
    reading.start()
    time.sleep(0.5)  # the read holds the only reader for about 2 s
    wh.close()
    reading.join()
    assert answers == [[(7.0,), (7.0,)]]
    with pytest.raises(WarehouseError, match="closed"):
        wh.query("SELECT 1")
    # every connection let go of the folder: another warehouse can open one now
    other = ChdbWarehouse(tmp_path / "other")
    assert rows(other.query("SELECT 1")) == [(1,)]
    other.close()


def test_a_reader_that_cannot_be_cleaned_after_a_failure_is_dropped(tmp_path, monkeypatch):
    import vtp.core.warehouse as warehouse_module

    wh = ChdbWarehouse(tmp_path / "wh", readers=1)
    try:
        assert rows(wh.query("SELECT 1")) == [(1,)]
        (first,) = wh._readers._idle
        monkeypatch.setattr(warehouse_module, "_drain", lambda client: False)
        with pytest.raises(WarehouseError, match="no_such_column"):
            wh.query("SELECT no_such_column")
        monkeypatch.undo()
        assert wh._readers._idle == []  # not pooled again: it may hold the failure's output
        assert rows(wh.query("SELECT 2")) == [(2,)]  # a fresh reader in its slot
        assert wh._readers._idle and wh._readers._idle[0] is not first
    finally:
        wh.close()


def test_access_log_rows_of_concurrent_requests_go_in_together_and_each_waits_for_its_own(
    tmp_path,
):
    import threading

    from owner_api.audit import AuditEntry, AuditLog

    wh = ChdbWarehouse(tmp_path / "wh")
    try:
        migrate(wh)
        log = AuditLog(wh)

        def requests(worker: int) -> None:
            for i in range(25):
                log.record(AuditEntry("o", f"r{worker}-{i}", "owner", "", "read", "me", "", 1, 200))
                # its row is there when record() returns: an answer never outruns it
                found = wh.query(
                    "SELECT count() FROM audit_log WHERE request_id = {r:String}",
                    {"r": f"r{worker}-{i}"},
                )
                assert rows(found) == [(1,)]

        threads = [threading.Thread(target=requests, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert rows(wh.query("SELECT count(), uniqExact(request_id) FROM audit_log")) == [
            (200, 200)
        ]
        assert log.inserts < 200  # batched: fewer INSERTs (parts) than rows
        ttl = rows(
            wh.query("SELECT create_table_query FROM system.tables WHERE name = 'sink_batches'")
        )
        assert "TTL" in ttl[0][0]
    finally:
        wh.close()


def test_bytes_handed_in_are_read_as_a_table_and_an_insert_of_them_happens_once(warehouse):
    from vtp.core.warehouse import Input

    warehouse.execute(
        "CREATE TABLE IF NOT EXISTS handed (n UInt32, s String) ENGINE = MergeTree ORDER BY n "
        "SETTINGS non_replicated_deduplication_window = 100"
    )
    given = {"lines": Input(b"1,one\n2,two\n", "CSV", "n UInt32, s String")}
    found = warehouse.query_inputs("SELECT n, s FROM @lines ORDER BY n", given)
    assert rows(found) == [(1, "one"), (2, "two")]
    insert = "INSERT INTO handed SELECT n * {k:UInt32}, s FROM @lines"
    for factor in (10, 10, 99):  # a retry with other contents: the token says it is done
        warehouse.execute_inputs(
            insert, given, {"k": factor}, {"insert_deduplication_token": "h-0-0-1"}
        )
    assert rows(warehouse.query("SELECT n, s FROM handed ORDER BY n")) == [(10, "one"), (20, "two")]
    if isinstance(warehouse, ChdbWarehouse):  # its files went with their statements
        assert list(warehouse.inputs_folder.iterdir()) == []


def test_inputs_and_settings_are_checked_before_anything_runs(warehouse):
    from vtp.core.warehouse import Input

    given = {"lines": Input(b"1\n", "CSV", "n UInt32")}
    with pytest.raises(WarehouseError, match="names inputs"):
        warehouse.query_inputs("SELECT * FROM @lines, @other", given)
    with pytest.raises(WarehouseError, match="names inputs"):
        warehouse.query_inputs("SELECT 1", given)
    with pytest.raises(ValueError, match="unsafe"):
        warehouse.execute_inputs("SELECT * FROM @lines", given, None, {"max_threads": "1'; DROP"})
    with pytest.raises(ValueError, match="unsafe"):
        warehouse.execute_inputs("SELECT * FROM @lines", given, None, {"a b": 1})


def test_embedded_inserts_never_leave_owner_rows_in_the_system_temp_folder(tmp_path, monkeypatch):
    # clickhouse-connect's chdb backend stages inserts in /tmp, where a killed process
    # would leave them beyond an erasure's reach: vtp stages them in the warehouse folder.
    import tempfile

    wh = ChdbWarehouse(tmp_path / "wh")
    try:
        migrate(wh)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
        assert wh.insert_arrow("samples", samples_table([upload("u-1")]), "t-0-0-1") == 3
        assert rows(wh.query("SELECT count() FROM samples")) == [(3,)]
        assert list(wh.inputs_folder.iterdir()) == []
    finally:
        wh.close()


def test_what_a_cluster_adds_to_each_client_is_a_setting_the_engine_knows(tmp_path):
    from vtp.core.warehouse import cluster_session
    from vtp.core.warehouse_targets import EmbeddedEngine

    assert cluster_session("") == {}
    engine = EmbeddedEngine(tmp_path / "wh")
    client = engine.client(cluster_session("vtp_cluster"))  # an unknown name fails here
    try:
        found = client.query_arrow(
            "SELECT value FROM system.settings WHERE name = 'distributed_foreground_insert'"
        )
        assert rows(found) == [("1",)]  # what the old name stands for on a current engine
    finally:
        client.close()
        engine.close()


def test_an_analyst_query_after_close_is_refused(tmp_path):
    wh = ChdbWarehouse(tmp_path / "wh")
    wh.close()
    with pytest.raises(WarehouseError, match="closed"):
        wh.analyst_query("SELECT 1", None, {"readonly": "1"})

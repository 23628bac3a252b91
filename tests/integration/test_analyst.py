"""Analysts see pseudonyms and ~1 km positions over the analyst_* views, and nothing else:
no other table, no file, no URL, no setting, no second statement; their queries run
read-only under limits they cannot change, beside the writer rather than in its way."""

from __future__ import annotations

import threading
import time

import pytest

from owner_api.analyst import AnalystLimits, AnalystQueryError, run_analyst_query
from sinks.migrations import migrate
from sinks.pseudonyms import record_pairs
from vtp.core.keys import pseudonym_key
from vtp.core.settings import Settings
from vtp.core.warehouse import ChdbWarehouse, rows

pytestmark = pytest.mark.integration
LIMITS = AnalystLimits(max_execution_s=2.0, max_memory_bytes=512 * 2**20)


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("analyst"), region="eu")
    wh = ChdbWarehouse(settings.warehouse_path)
    migrate(wh)
    key = pseudonym_key(settings)
    for owner, vin, lat in [
        ("owner-A", "VINAAAAAAAAAAAAA1", 52.123456),
        ("owner-B", "VINBBBBBBBBBBBBB2", 31.2304),
    ]:
        wh.execute(
            "INSERT INTO samples (owner_id, vin, event_time, seq, upload_id, speed, latitude, "
            "longitude, odometer, region, schema_version, received_at) VALUES ({o:String}, "
            "{v:String}, now64(3), 1, 'u1', 50, {lat:Float64}, 4.987654, 12345.6, 'eu', 1, now64(3))",
            {"o": owner, "v": vin, "lat": lat},
        )
        record_pairs(wh, key, {(owner, vin)})
    # enough rows for a join that runs away
    wh.execute(
        "INSERT INTO samples (owner_id, vin, event_time, seq, upload_id, region, schema_version, "
        "received_at) SELECT 'owner-A', 'VINAAAAAAAAAAAAA1', now64(3), number + 10, 'u2', 'eu', 1, "
        "now64(3) FROM numbers(200000)"
    )
    yield settings, wh, key
    wh.close()


def test_the_views_hold_pseudonyms_and_coarse_positions_only(region):
    _, wh, key = region
    result = run_analyst_query(
        wh, "SELECT * FROM analyst_samples WHERE latitude IS NOT NULL ORDER BY latitude", LIMITS
    )
    text = str(result.to_pylist())
    for raw in ("owner-A", "owner-B", "VINAAAAAAAAAAAAA1", "u1", "12345.6", key.decode()):
        assert raw not in text
    assert "odometer" not in result.column_names and "owner_id" not in result.column_names
    found = result.to_pylist()
    assert [r["latitude"] for r in found] == [31.23, 52.12] and found[1]["longitude"] == 4.99
    assert len({r["owner_ref"] for r in found}) == 2 and len(found[0]["owner_ref"]) == 16
    again = run_analyst_query(
        wh,
        "SELECT owner_ref FROM analyst_samples WHERE latitude IS NOT NULL ORDER BY latitude",
        LIMITS,
    )
    assert [r["owner_ref"] for r in again.to_pylist()] == [r["owner_ref"] for r in found]


def test_no_secret_is_in_the_warehouse(region):
    settings, wh, key = region
    tables = [
        t
        for (t,) in rows(
            wh.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
        )
    ]
    for table in tables:
        assert key not in wh.query_raw(f"SELECT * FROM `{table}`", None, "TSV"), table
    for path in settings.warehouse_path.rglob("*"):
        if path.is_file():
            assert key not in path.read_bytes(), path


def attacks(settings: Settings) -> list[str]:
    key_file = settings.keys_path / "pseudonym.key"
    return [
        "SELECT * FROM samples",
        "SELECT * FROM default.samples",
        "SELECT * FROM pseudonyms",
        "SELECT * FROM system.tables",
        "SELECT * FROM system.processes",
        "SELECT * FROM (SELECT owner_id FROM samples)",
        "SELECT * FROM analyst_samples AS a JOIN samples AS s ON a.region = s.region",
        "SELECT 1 FROM analyst_samples WHERE 'owner-A' IN samples",
        "SELECT 1 FROM analyst_samples WHERE 'owner-A' IN pseudonyms",
        "WITH x AS (SELECT owner_id FROM samples) SELECT * FROM x",
        f"SELECT file('{key_file}')",
        "SELECT file('/proc/self/environ')",
        f"SELECT * FROM file('{key_file}', 'LineAsString')",
        f"SELECT * FROM `{key_file}`",
        "SELECT * FROM `/proc/self/environ`",
        f"SELECT count() FROM analyst_samples WHERE owner_ref = file('{key_file}')",
        "SELECT * FROM url('http://127.0.0.1:1/', 'CSV')",
        "SELECT * FROM merge('default', '.*')",
        "SELECT * FROM numbers(10)",
        "SELECT dictGet('d', 'x', 1)",
        "SELECT joinGet('j', 'x', 1)",
        "SELECT getSetting('max_execution_time')",
        "SELECT getServerSetting('path')",
        "SELECT currentDatabase()",
        "SELECT hostName()",
        "SELECT sleep(3)",
        f"SELECT * FROM analyst_samples INTO OUTFILE '{settings.data_dir / 'out.csv'}'",
        "SELECT * FROM analyst_samples FORMAT CSV",
        "SELECT count() FROM analyst_samples SETTINGS max_execution_time = 1000",
        "SELECT count() FROM analyst_samples SETTINGS readonly = 0",
        "SELECT `a\nFunction file` FROM analyst_samples",
        "INSERT INTO samples (owner_id) VALUES ('x')",
        "DROP TABLE samples",
        "SELECT 1; DROP TABLE samples",
        "SELECT 1; SELECT * FROM samples",
        "KILL QUERY WHERE 1",
        "SET readonly = 0",
        "USE system",
        "   ",
    ]


def test_anything_beyond_the_views_is_refused_and_leaves_no_trace(region):
    settings, wh, _ = region
    before = rows(wh.query("SELECT count() FROM samples"))
    for sql in attacks(settings):
        with pytest.raises(AnalystQueryError) as refused:
            run_analyst_query(wh, sql, LIMITS)
        assert refused.value.code == "query_refused", (sql, refused.value)
    with pytest.raises(AnalystQueryError):
        run_analyst_query(wh, "SELEC nonsense", LIMITS)
    assert rows(wh.query("SELECT count() FROM samples")) == before
    assert not (settings.data_dir / "out.csv").exists()


def test_joins_subqueries_and_ordinary_analysis_are_fine(region):
    _, wh, _ = region
    result = run_analyst_query(
        wh,
        "SELECT count() AS n FROM analyst_samples WHERE owner_ref IN "
        "(SELECT owner_ref FROM analyst_samples WHERE latitude > 40)",
        LIMITS,
    )
    assert result.to_pylist() == [{"n": 200001}]
    for sql in [
        (
            "SELECT owner_ref, count() AS n, avg(speed), quantile(0.9)(speed), max(event_time) "
            "FROM analyst_samples GROUP BY owner_ref ORDER BY n DESC"
        ),
        (
            "SELECT toStartOfHour(event_time) AS h, uniqExact(vehicle_ref), countIf(speed > 30) "
            "FROM analyst_samples GROUP BY h"
        ),
        "SELECT region, sum(distance_km), round(avg(energy_kwh), 2) FROM analyst_trips GROUP BY region",
        (
            "SELECT vehicle_ref, row_number() OVER (PARTITION BY vehicle_ref ORDER BY event_time) "
            "FROM analyst_samples LIMIT 3"
        ),
        (
            "SELECT arrayMap(x -> x * 2, [1, 2]), CASE WHEN 1 = 1 THEN 'a' ELSE 'b' END, "
            "greatCircleDistance(4.9, 52.1, 13.4, 52.5)"
        ),
        "SELECT owner_ref,\n       count() AS n\r\nFROM analyst_samples\n\tGROUP BY owner_ref  -- as typed",
        "SELECT 'a\\b' AS backslash, 'it''s' AS quote",
    ]:
        run_analyst_query(wh, sql, LIMITS)


def test_a_runaway_query_is_cancelled_and_the_writer_is_not_held_up(region):
    _, wh, _ = region
    done: dict[str, object] = {}

    def runaway() -> None:
        try:
            run_analyst_query(
                wh,
                "SELECT sum(length(a.vehicle_ref) * length(b.owner_ref)) FROM analyst_samples AS a, analyst_samples AS b",
                LIMITS,
            )
        except AnalystQueryError as exc:
            done["error"] = exc

    thread = threading.Thread(target=runaway)
    thread.start()
    time.sleep(0.5)
    writes_while_running = 0
    while thread.is_alive():
        n = writes_while_running
        wh.execute(
            "INSERT INTO sink_batches (topic, partition, first_offset, last_offset, messages) "
            "VALUES ('probe', 0, {n:UInt64}, {n:UInt64}, 1)",
            {"n": n},
        )
        assert rows(wh.query("SELECT count() FROM sink_batches WHERE topic = 'probe'")) == [
            (n + 1,)
        ]
        writes_while_running += thread.is_alive()
        time.sleep(0.05)
    thread.join(30)
    assert done["error"].code == "query_cancelled", done["error"]
    assert "TIMEOUT_EXCEEDED" in str(done["error"])
    # the writer went on while the analyst's query ran: it was never in the writer's way
    assert writes_while_running >= 3
    # the connection the writer uses answers with its own results afterwards
    assert rows(wh.query("SELECT 42")) == [(42,)]


@pytest.mark.parametrize(
    ("sql", "what"),
    [
        (
            "SELECT sum(length(a.vehicle_ref) * length(b.owner_ref)) FROM analyst_samples AS a, analyst_samples AS b",
            "TIMEOUT",
        ),
        (
            (
                "SELECT groupArray(toString(event_time)) FROM analyst_samples AS a, analyst_samples AS b "
                "GROUP BY a.owner_ref"
            ),
            "LIMIT",
        ),
        ("SELECT event_time FROM analyst_samples", "LIMIT"),  # more rows than may be returned
    ],
)
def test_limits_cancel_queries_that_take_too_long_too_much_or_return_too_much(region, sql, what):
    _, wh, _ = region
    tight = AnalystLimits(max_execution_s=2.0, max_memory_bytes=64 * 2**20, max_result_rows=1000)
    with pytest.raises(AnalystQueryError) as caught:
        run_analyst_query(wh, sql, tight)
    assert caught.value.code == "query_cancelled"
    assert what in str(caught.value).upper()


def test_results_are_bounded_in_size_and_strange_text_and_deep_nesting_are_answered(region):
    _, wh, _ = region
    small = AnalystLimits(max_execution_s=5.0, max_result_bytes=2**20)
    with pytest.raises(AnalystQueryError, match="larger than 1 MiB") as big:
        run_analyst_query(
            wh,
            "SELECT toString(event_time), owner_ref, vehicle_ref FROM analyst_samples LIMIT 50000",
            small,
        )
    assert big.value.code == "query_cancelled"
    deep = "SELECT " + "abs(" * 250 + "1" + ")" * 250
    with pytest.raises(AnalystQueryError, match="nests deeper") as nested:
        run_analyst_query(wh, deep, LIMITS)
    assert nested.value.code == "query_refused"
    from owner_api.analyst import result_rows

    # half of a two-byte character is not UTF-8: answered with a replacement character
    odd = run_analyst_query(
        wh, "SELECT substring('é', 1, 1) AS half, [substring('é', 1, 1)] AS a", LIMITS
    )
    assert result_rows(odd) == [["\ufffd", ["\ufffd"]]]


def test_literals_with_escapes_come_back_as_written(region):
    # The parse check reads EXPLAIN's text output, where these are escaped.
    _, wh, _ = region
    sql = r"SELECT 'a\\b' AS slash, 'it''s' AS quote, 'x\ty' AS tab, 'a\bz' AS backspace"
    result = run_analyst_query(wh, sql, LIMITS)
    assert result.to_pylist() == [
        {"slash": "a\\b", "quote": "it's", "tab": "x\ty", "backspace": "a\bz"}
    ]


def test_values_with_unicode_line_separators_are_one_line_of_the_parse_check(region):
    _, wh, _ = region
    sql = "SELECT 'a\u2028b\x1cc' AS s, 1 AS `x\u2029y`"
    assert run_analyst_query(wh, sql, LIMITS).to_pylist() == [{"s": "a\u2028b\x1cc", "x\u2029y": 1}]

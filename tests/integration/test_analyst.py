"""Analysts see pseudonyms and ~1 km positions, and nothing but the analyst_* views."""

from __future__ import annotations

import pytest

from owner_api.analyst import AnalystQueryError, run_analyst_query
from sinks.migrations import migrate
from sinks.warehouse import ChdbWarehouse, rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    wh = ChdbWarehouse(tmp_path_factory.mktemp("analyst"))
    migrate(wh)
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
    yield wh
    wh.close()


def test_the_views_hold_pseudonyms_and_coarse_positions_only(warehouse):
    result = run_analyst_query(warehouse, "SELECT * FROM analyst_samples ORDER BY latitude")
    text = str(result.to_pylist())
    for raw in ("owner-A", "owner-B", "VINAAAAAAAAAAAAA1", "u1", "12345.6"):
        assert raw not in text
    assert "odometer" not in result.column_names and "owner_id" not in result.column_names
    found = result.to_pylist()
    assert [r["latitude"] for r in found] == [31.23, 52.12] and found[1]["longitude"] == 4.99
    assert len({r["owner_ref"] for r in found}) == 2 and len(found[0]["owner_ref"]) == 16
    again = run_analyst_query(warehouse, "SELECT owner_ref FROM analyst_samples ORDER BY latitude")
    assert [r["owner_ref"] for r in again.to_pylist()] == [r["owner_ref"] for r in found]  # stable


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM samples",
        "SELECT * FROM default.samples",
        "SELECT * FROM system.tables",
        "SELECT * FROM pseudonym_key",
        "SELECT * FROM (SELECT owner_id FROM samples)",
        "SELECT * FROM analyst_samples AS a JOIN samples AS s ON a.region = s.region",
        "SELECT 1 FROM analyst_samples WHERE 'owner-A' IN samples",
        "WITH x AS (SELECT owner_id FROM samples) SELECT * FROM x",
        "SELECT * FROM file('/etc/passwd', 'CSV')",
        "SELECT * FROM merge('default', '.*')",
        "SELECT * FROM url('http://127.0.0.1:1/', 'CSV')",
        "SELECT dictGet('d', 'x', 1)",
        "SELECT joinGet('j', 'x', 1)",
        "INSERT INTO samples (owner_id) VALUES ('x')",
        "DROP TABLE samples",
        "SELECT 1; DROP TABLE samples",
        "SELEC nonsense",
        "   ",
    ],
)
def test_anything_beyond_the_views_is_refused(warehouse, sql):
    with pytest.raises(AnalystQueryError):
        run_analyst_query(warehouse, sql)
    assert rows(warehouse.query("SELECT count() FROM samples"))[0][0] == 2


def test_joins_and_subqueries_over_the_views_are_fine(warehouse):
    result = run_analyst_query(
        warehouse,
        "SELECT count() AS n FROM analyst_samples WHERE owner_ref IN "
        "(SELECT owner_ref FROM analyst_samples WHERE latitude > 40)",
    )
    assert result.to_pylist() == [{"n": 1}]

"""The scope allow-list is consistent with itself and with the signals."""

from owner_api.scopes import (
    EXPORT_COLUMNS,
    INTERNAL_COLUMNS,
    ROUTE_COLUMNS,
    ROUTE_SCOPE,
    SCOPES,
    SIGNAL_SCOPE,
    visible_columns,
)
from sinks.rows import SIGNAL_COLUMNS


def test_every_signal_has_exactly_one_scope_and_every_scope_opens_something():
    assert set(SIGNAL_SCOPE) == set(SIGNAL_COLUMNS) | {"dtcs"}
    assert set(SIGNAL_SCOPE.values()) == set(SCOPES)
    opened = {s for cols in ROUTE_COLUMNS.values() for s in cols.values() if s}
    assert opened == set(SCOPES)


def test_routes_show_a_subset_of_the_export_and_never_owner_or_bookkeeping_columns():
    for table, columns in ROUTE_COLUMNS.items():
        assert set(columns) <= set(EXPORT_COLUMNS[table]), table
        assert not {"owner_id", "region", "version", "record"} & set(columns), table
        assert ROUTE_SCOPE[table] in (None, *SCOPES)
    for table, columns in INTERNAL_COLUMNS.items():
        assert not set(columns) & set(EXPORT_COLUMNS[table]), table


def test_a_caller_sees_only_the_columns_of_their_scopes():
    assert visible_columns("trips", ["driving"]) == [
        "vin",
        "start_time",
        "end_time",
        "duration_s",
        "distance_km",
        "avg_speed_kmh",
        "max_speed_kmh",
        "start_odometer",
        "end_odometer",
    ]
    assert "start_lat" in visible_columns("trips", ["driving", "location"])
    assert visible_columns("samples", []) == ["event_time", "seq"]

"""Aggregate records (schemas.aggregates, from the aggregation job) -> Arrow tables, one per
table. Pure."""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import pyarrow as pa

TS = pa.timestamp("ms", tz="UTC")
F = pa.float64()

TRIPS = pa.schema(
    [
        ("owner_id", pa.string()),
        ("vin", pa.string()),
        ("start_time", TS),
        ("end_time", TS),
        ("duration_s", F),
        ("start_lat", F),
        ("start_lon", F),
        ("end_lat", F),
        ("end_lon", F),
        ("start_odometer", F),
        ("end_odometer", F),
        ("distance_km", F),
        ("avg_speed_kmh", F),
        ("max_speed_kmh", F),
        ("start_soc", F),
        ("end_soc", F),
        ("soc_used", F),
        ("energy_kwh", F),
        ("outside_temp_avg", F),
        ("region", pa.string()),
        ("version", pa.uint64()),
    ]
)
CHARGES = pa.schema(
    [
        ("owner_id", pa.string()),
        ("vin", pa.string()),
        ("start_time", TS),
        ("end_time", TS),
        ("duration_s", F),
        ("lat", F),
        ("lon", F),
        ("start_soc", F),
        ("end_soc", F),
        ("energy_added_kwh", F),
        ("energy_metered_kwh", F),
        ("peak_power_kw", F),
        ("avg_power_kw", F),
        ("mode", pa.string()),
        ("region", pa.string()),
        ("version", pa.uint64()),
    ]
)
DAYS = pa.schema(
    [
        ("owner_id", pa.string()),
        ("vin", pa.string()),
        ("date", pa.date32()),
        ("time_zone", pa.string()),
        ("samples", pa.uint32()),
        ("distance_km", F),
        ("driving_s", F),
        ("energy_used_kwh", F),
        ("energy_charged_kwh", F),
        ("idle_drain_kwh", F),
        ("parked_s", F),
        ("trips", pa.uint32()),
        ("charges", pa.uint32()),
        ("efficiency_wh_per_km", F),
        ("final", pa.bool_()),
        ("region", pa.string()),
        ("version", pa.uint64()),
    ]
)
OPEN = pa.schema(
    [
        ("owner_id", pa.string()),
        ("vin", pa.string()),
        ("kind", pa.string()),
        ("active", pa.bool_()),
        ("start_time", TS),
        ("end_time", TS),
        ("distance_km", F),
        ("energy_kwh", F),
        ("start_soc", F),
        ("end_soc", F),
        ("record", pa.string()),
        ("region", pa.string()),
        ("version", pa.uint64()),
    ]
)

TABLES = {
    "trip": ("trips", TRIPS),
    "charge": ("charges", CHARGES),
    "day": ("daily_summaries", DAYS),
}


def _row(record: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    row = dict(record)
    row["start_time"] = record.get("start_ms")
    row["end_time"] = record.get("end_ms")
    if "date" in record:
        row["date"] = date.fromisoformat(record["date"])
    if record["kind"].startswith("open_"):
        row["kind"] = record["kind"][len("open_") :]
        row["energy_kwh"] = record.get("energy_kwh", record.get("energy_added_kwh"))
        row["record"] = json.dumps(record)
    return {name: row.get(name) for name in schema.names}


def aggregate_tables(records: list[dict[str, Any]]) -> dict[str, pa.Table]:
    """Records grouped into {table name: Arrow table}; unknown kinds raise KeyError."""
    grouped: dict[str, tuple[pa.Schema, list[dict[str, Any]]]] = {}
    for record in records:
        kind = record["kind"]
        name, schema = ("open_sessions", OPEN) if kind.startswith("open_") else TABLES[kind]
        grouped.setdefault(name, (schema, []))[1].append(_row(record, schema))
    return {
        name: pa.Table.from_pylist(rows, schema=schema) for name, (schema, rows) in grouped.items()
    }

"""What each scope opens, column by column: the one allow-list every route and the export
read. A column that is not listed here leaves the warehouse through no route; a new
column stays closed until someone lists it (tests/unit/test_scopes.py and the warehouse
check in tests/integration/test_warehouse.py fail until they do).

A route is opened by its table's scope (``ROUTE_SCOPE``); inside it, a caller sees the
columns whose scope it holds (``None``: every caller of the route). Owners hold every
scope; a grant holds the scopes the owner chose.
"""

from __future__ import annotations

SCOPES = ("location", "driving", "battery", "diagnostics", "climate")

SIGNAL_SCOPE = {
    "latitude": "location",
    "longitude": "location",
    "heading": "location",
    "speed": "driving",
    "odometer": "driving",
    "gear": "driving",
    "soc": "battery",
    "is_charging": "battery",
    "charge_power": "battery",
    "charge_mode": "battery",
    "battery_temperature": "battery",
    "dtcs": "diagnostics",
    "outside_temperature": "climate",
    "cabin_temperature": "climate",
}

# Per route's table: column -> the scope that shows it (None: anyone the route admits).
# Kept unformatted: one line per scope reads as the table it is.
ROUTE_COLUMNS: dict[str, dict[str, str | None]] = {
    "samples": {"event_time": None, "seq": None, **SIGNAL_SCOPE},
    "trips": {
        "vin": None, "start_time": None, "end_time": None, "duration_s": None,
        "distance_km": "driving", "avg_speed_kmh": "driving", "max_speed_kmh": "driving",
        "start_odometer": "driving", "end_odometer": "driving",
        "start_lat": "location", "start_lon": "location", "end_lat": "location",
        "end_lon": "location",
        "start_soc": "battery", "end_soc": "battery", "soc_used": "battery",
        "energy_kwh": "battery",
        "outside_temp_avg": "climate",
    },
    "charges": {
        "vin": None, "start_time": None, "end_time": None, "duration_s": None,
        "start_soc": "battery", "end_soc": "battery", "energy_added_kwh": "battery",
        "energy_metered_kwh": "battery", "peak_power_kw": "battery", "avg_power_kw": "battery",
        "mode": "battery",
        "lat": "location", "lon": "location",
    },
    "daily_summaries": {
        "vin": None, "date": None, "time_zone": None, "final": None, "samples": None,
        "distance_km": "driving", "driving_s": "driving", "parked_s": "driving",
        "trips": "driving",
        "energy_used_kwh": "battery", "energy_charged_kwh": "battery",
        "idle_drain_kwh": "battery", "efficiency_wh_per_km": "battery", "charges": "battery",
    },
}  # fmt: skip
ROUTE_SCOPE = {
    "samples": None,
    "trips": "driving",
    "charges": "battery",
    "daily_summaries": "driving",
}

# What the owner's export holds per table, in this order; and what stays inside.
# Kept unformatted: one entry per table, its columns in a paragraph.
EXPORT_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": ("owner_id", "vin", "event_time", "seq", "upload_id", *SIGNAL_SCOPE, "region",
                "schema_version", "received_at"),
    "uploads": ("owner_id", "vin", "upload_id", "sent_at", "received_at", "first_event_time",
                "last_event_time", "sample_count", "gateway_firmware", "schema_version", "region"),
    "trips": ("owner_id", *ROUTE_COLUMNS["trips"], "region"),
    "charges": ("owner_id", *ROUTE_COLUMNS["charges"], "region"),
    "daily_summaries": ("owner_id", *ROUTE_COLUMNS["daily_summaries"], "region"),
    "open_sessions": ("owner_id", "vin", "kind", "active", "start_time", "end_time",
                      "distance_km", "energy_kwh", "start_soc", "end_soc", "region"),
    "grants": ("owner_id", "grant_id", "party", "scopes", "created_at", "expires_at",
               "revoked_at"),
    "audit_log": ("owner_id", "at", "request_id", "actor", "grant_id", "action", "resource",
                  "detail", "rows", "status"),
}  # fmt: skip
# Bookkeeping no route shows: deduplication versions, Kafka positions, raw records.
INTERNAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": (),
    "uploads": ("raw_source", "topic", "partition", "offset", "stored_at"),
    "trips": ("version",),
    "charges": ("version",),
    "daily_summaries": ("version",),
    "open_sessions": ("record", "version"),
    "grants": ("version",),
    "audit_log": (),
}


def visible_columns(table: str, scopes: tuple[str, ...] | list[str]) -> list[str]:
    """The columns of ``table``'s route a caller holding ``scopes`` may see, in order."""
    return [c for c, scope in ROUTE_COLUMNS[table].items() if scope is None or scope in scopes]

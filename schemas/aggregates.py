"""Aggregate records on the wire (``AggregateRecord.v1.avsc``, single-object Avro), and
back to the flat records the aggregation emits and the sink stores.

The flat record is the base (kind, vin, owner_id, region, final, version), then the
fields of its trip, charge or day, then for an open slot ``active`` and ``as_of_ms``; on
the wire the fields sit in a nested record per kind, so each kind's fields are typed and
required where they always exist. Messages written as JSON by a worker before vtp 0.4
are still read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal, TypedDict

from schemas.codec import FramingError, Schema, SchemaStore, default_store

Kind = Literal["trip", "charge", "day", "open_trip", "open_charge"]


class RecordBase(TypedDict):
    kind: Kind
    vin: str
    owner_id: str  # registered here at the record's time
    region: str
    final: bool  # False: provisional, a later record of the same key replaces it
    version: int  # grows with every emission of the vehicle: the newest row wins


class TripFields(TypedDict):
    start_ms: int  # the trip's key
    end_ms: int
    duration_s: float
    start_lat: float | None
    start_lon: float | None
    end_lat: float | None
    end_lon: float | None
    start_odometer: float | None
    end_odometer: float | None
    distance_km: float
    avg_speed_kmh: float
    max_speed_kmh: float
    start_soc: float | None
    end_soc: float | None
    soc_used: float | None
    energy_kwh: float | None
    outside_temp_avg: float | None


class ChargeFields(TypedDict):
    start_ms: int  # the session's key
    end_ms: int
    duration_s: float
    lat: float | None
    lon: float | None
    start_soc: float | None
    end_soc: float | None
    energy_added_kwh: float
    energy_metered_kwh: float
    peak_power_kw: float
    avg_power_kw: float
    mode: str | None


class DayFields(TypedDict):
    date: str  # local date, ISO 8601
    time_zone: str
    samples: int
    distance_km: float
    driving_s: float
    energy_used_kwh: float | None
    energy_charged_kwh: float | None
    idle_drain_kwh: float | None
    parked_s: float
    trips: int
    charges: int
    efficiency_wh_per_km: float | None


class SlotFields(TypedDict):
    active: bool  # does the vehicle's open slot hold a session
    as_of_ms: int | None  # the newest event time the slot speaks for


class TripRecord(RecordBase, TripFields): ...


class ChargeRecord(RecordBase, ChargeFields): ...


class DayRecord(RecordBase, DayFields): ...


class OpenTripRecord(RecordBase, TripFields, SlotFields): ...


class OpenChargeRecord(RecordBase, ChargeFields, SlotFields): ...


class EmptySlotRecord(RecordBase, SlotFields): ...


# What the aggregation emits and the sink stores, flat.
AggregateRecord = (
    TripRecord | ChargeRecord | DayRecord | OpenTripRecord | OpenChargeRecord | EmptySlotRecord
)

BASE = ("kind", "vin", "owner_id", "region", "final", "version")
PART = {
    "trip": "trip",
    "open_trip": "trip",
    "charge": "charge",
    "open_charge": "charge",
    "day": "day",
}
OPEN_SLOT = ("active", "as_of_ms")


@cache
def _schema() -> Schema:
    return default_store().get("AggregateRecord", 1)


@cache
def _part_fields() -> dict[str, tuple[str, ...]]:
    out = {}
    for f in _schema().definition["fields"]:
        if f["name"] in ("trip", "charge", "day"):
            out[f["name"]] = tuple(g["name"] for g in f["type"][1]["fields"])
    return out


def encode_aggregate(record: Mapping[str, Any], store: SchemaStore | None = None) -> bytes:
    """One flat aggregate record as a framed AggregateRecord; a record that does not fit
    the schema raises (KeyError, ValueError, TypeError): a bug in the aggregation."""
    kind = record["kind"]
    part = PART[kind]
    is_open = kind.startswith("open_")
    wire: dict[str, Any] = {k: record[k] for k in BASE}
    wire.update(
        active=record["active"] if is_open else None,
        as_of_ms=record["as_of_ms"] if is_open else None,
        trip=None,
        charge=None,
        day=None,
    )
    if not is_open or record["active"]:
        wire[part] = {name: record[name] for name in _part_fields()[part]}
    return (store or default_store()).encode(wire, _schema())


def decode_aggregate(data: bytes, store: SchemaStore | None = None) -> dict[str, Any]:
    """The flat record of a framed AggregateRecord (or of a JSON one from an older
    worker), untrusted: the sink checks its fields. Raises FramingError (a ValueError)
    when it is neither."""
    if data[:1] == b"{":
        try:
            record = json.loads(data)
        except ValueError as exc:
            raise FramingError("malformed_json", str(exc)) from None
        if not isinstance(record, dict):
            raise FramingError("malformed_json", f"a JSON {type(record).__name__}")
        return record
    wire, _ = (store or default_store()).decode(data)
    record = {k: wire[k] for k in BASE}
    nested = wire[PART[record["kind"]]]
    if nested is not None:
        record.update(nested)
    if record["kind"].startswith("open_"):
        record.update((k, wire[k]) for k in OPEN_SLOT)
    return record

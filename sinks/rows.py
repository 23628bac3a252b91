"""Decoded uploads -> Arrow tables for the samples and uploads tables. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

TS = pa.timestamp("ms", tz="UTC")

SAMPLES_SCHEMA = pa.schema(
    [
        ("owner_id", pa.string()),
        ("vin", pa.string()),
        ("event_time", TS),
        ("seq", pa.uint64()),
        ("upload_id", pa.string()),
        ("speed", pa.float32()),
        ("latitude", pa.float64()),
        ("longitude", pa.float64()),
        ("heading", pa.float32()),
        ("odometer", pa.float64()),
        ("soc", pa.float32()),
        ("is_charging", pa.bool_()),
        ("charge_power", pa.float32()),
        ("charge_mode", pa.string()),
        ("battery_temperature", pa.float32()),
        ("outside_temperature", pa.float32()),
        ("gear", pa.string()),
        ("dtcs", pa.list_(pa.string())),
        ("cabin_temperature", pa.float32()),
        ("region", pa.string()),
        ("schema_version", pa.uint8()),
        ("received_at", TS),
    ]
)
# Signals copied from each sample as they are; a reader schema without one (v1) gives None.
SIGNAL_COLUMNS = [
    "speed",
    "latitude",
    "longitude",
    "heading",
    "odometer",
    "soc",
    "is_charging",
    "charge_power",
    "charge_mode",
    "battery_temperature",
    "outside_temperature",
    "gear",
    "cabin_temperature",
]

UPLOADS_SCHEMA = pa.schema(
    [
        ("owner_id", pa.string()),
        ("vin", pa.string()),
        ("upload_id", pa.string()),
        ("sent_at", TS),
        ("received_at", TS),
        ("first_event_time", TS),
        ("last_event_time", TS),
        ("sample_count", pa.uint32()),
        ("gateway_firmware", pa.string()),
        ("schema_version", pa.uint8()),
        ("region", pa.string()),
        ("raw_source", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.uint32()),
        ("offset", pa.uint64()),
    ]
)


@dataclass(frozen=True)
class StoredUpload:
    """One validated message, decoded, with what the sink knows about it."""

    record: dict[str, Any]
    owner_id: str
    region: str
    schema_version: int
    received_ms: int
    raw_source: str
    topic: str
    partition: int
    offset: int


def samples_table(uploads: list[StoredUpload]) -> pa.Table:
    cols: dict[str, list[Any]] = {name: [] for name in SAMPLES_SCHEMA.names}
    signal_lists = [(name, cols[name]) for name in SIGNAL_COLUMNS]
    for up in uploads:
        samples = up.record["samples"]
        n = len(samples)
        cols["owner_id"] += [up.owner_id] * n
        cols["vin"] += [up.record["vin"]] * n
        cols["upload_id"] += [up.record["upload_id"]] * n
        cols["region"] += [up.region] * n
        cols["schema_version"] += [up.schema_version] * n
        cols["received_at"] += [up.received_ms] * n
        for s in samples:
            cols["event_time"].append(s["event_time_ms"])
            cols["seq"].append(s["seq"])
            cols["dtcs"].append(s.get("dtcs") or [])
            for name, column in signal_lists:
                column.append(s.get(name))
    return pa.Table.from_pydict(cols, schema=SAMPLES_SCHEMA)


def uploads_table(uploads: list[StoredUpload]) -> pa.Table:
    cols: dict[str, list[Any]] = {name: [] for name in UPLOADS_SCHEMA.names}
    for up in uploads:
        rec = up.record
        times = [s["event_time_ms"] for s in rec["samples"]]
        values = (
            up.owner_id,
            rec["vin"],
            rec["upload_id"],
            rec["sent_at_ms"],
            up.received_ms,
            min(times),
            max(times),
            len(times),
            rec["gateway_firmware"],
            up.schema_version,
            up.region,
            up.raw_source,
            up.topic,
            up.partition,
            up.offset,
        )
        for name, value in zip(UPLOADS_SCHEMA.names, values, strict=True):
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=UPLOADS_SCHEMA)

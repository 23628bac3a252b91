"""Signal catalogue read from the upload schema: VSS name, unit and valid range.

The .avsc files are the single source of truth; validation and the SDK read the
ranges from the field properties ``vss``, ``unit``, ``min`` and ``max``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.codec import Schema


@dataclass(frozen=True)
class Signal:
    name: str
    vss: str
    unit: str
    kind: str  # float, double, boolean, enum, long, array
    minimum: float | None
    maximum: float | None
    symbols: tuple[str, ...] = ()


def _kind(avro_type: Any) -> tuple[str, tuple[str, ...]]:
    if isinstance(avro_type, list):  # ["null", T]
        avro_type = next(t for t in avro_type if t != "null")
    if isinstance(avro_type, dict):
        if avro_type["type"] == "enum":
            return "enum", tuple(avro_type["symbols"])
        return avro_type["type"], ()
    return avro_type, ()


def sample_signals(upload_schema: Schema) -> dict[str, Signal]:
    """Signals of the Sample record, by field name (event_time_ms and seq excluded)."""
    samples = next(f for f in upload_schema.definition["fields"] if f["name"] == "samples")
    out = {}
    for f in samples["type"]["items"]["fields"]:
        if f["name"] in ("event_time_ms", "seq"):
            continue
        kind, symbols = _kind(f["type"])
        out[f["name"]] = Signal(
            name=f["name"],
            vss=f.get("vss", ""),
            unit=f.get("unit", ""),
            kind=kind,
            minimum=f.get("min"),
            maximum=f.get("max"),
            symbols=symbols,
        )
    return out

"""Signal catalogue read from the upload schema: VSS name, unit and valid range.

The .avsc files are the single source of truth; validation and the SDK read the
ranges from the field properties ``vss``, ``unit``, ``min`` and ``max``.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def sample_problems(sample: Mapping[str, Any], signals: Mapping[str, Signal]) -> list[str]:
    """Why a sample is invalid (empty when valid): unknown signals, wrong types, out of range.

    Shared by the SDK (which raises at the call) and the stream job (which dead-letters).
    NaN fails every range check on purpose.
    """
    problems = []
    for key in ("event_time_ms", "seq"):
        value = sample.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"{key} must be a non-negative integer, got {value!r}")
    for name, value in sample.items():
        if name in ("event_time_ms", "seq") or value is None:
            continue
        signal = signals.get(name)
        if signal is None:
            problems.append(f"unknown signal {name!r}")
        elif signal.kind == "enum":
            if value not in signal.symbols:
                problems.append(
                    f"{name} ({signal.vss}) must be one of {signal.symbols}, got {value!r}"
                )
        elif signal.kind == "boolean":
            if not isinstance(value, bool):
                problems.append(f"{name} ({signal.vss}) must be a boolean, got {value!r}")
        elif signal.kind == "array":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                problems.append(f"{name} ({signal.vss}) must be a list of codes, got {value!r}")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(f"{name} ({signal.vss}) must be a number, got {value!r}")
        elif not (
            (signal.minimum is None or value >= signal.minimum)
            and (signal.maximum is None or value <= signal.maximum)
        ):
            problems.append(
                f"{name} ({signal.vss}) = {value!r} {signal.unit} is outside "
                f"[{signal.minimum}, {signal.maximum}]"
            )
    return problems

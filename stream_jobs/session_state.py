"""A vehicle's session state, typed, and its stored form.

The worker keeps one ``VehicleState`` per vehicle in a changelog-backed Faust table. The
stored form is compact JSON with short keys (``t``, ``v``, ``mv``…): it is written to
Kafka on every batch, so its size is the worker's biggest cost after decoding, and its
keys are those vtp has always written, so a worker restores the state an older one left.
Only ``to_json``/``from_json`` know those keys; the code works with the names below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Sample(NamedTuple):
    """The fields of a sample the state machines use (a tuple: the state holds one per
    buffered sample, and a frozen dataclass costs several times more to build)."""

    t: int  # event time, ms since the epoch
    seq: int
    speed: float | None
    odometer: float | None
    soc: float | None
    lat: float | None
    lon: float | None
    moving: bool  # out of PARK, or speed above 0
    charging: bool
    power_kw: float | None
    charge_mode: str | None
    outside_temp: float | None

    @classmethod
    def of(cls, sample: dict[str, Any]) -> Sample:
        """From a decoded upload's sample (built as a plain tuple: this runs per sample)."""
        get = sample.get
        speed = get("speed")
        return tuple.__new__(
            cls,
            (
                sample["event_time_ms"],
                sample["seq"],
                speed,
                get("odometer"),
                get("soc"),
                get("latitude"),
                get("longitude"),
                get("gear") not in (None, "PARK") or (speed or 0) > 0,
                bool(get("is_charging")),
                get("charge_power"),
                get("charge_mode"),
                get("outside_temperature"),
            ),
        )


@dataclass(slots=True)
class Trip:
    first: Sample
    last: Sample
    parked_since: int | None
    max_speed: float
    outside_sum: float
    outside_n: int


@dataclass(slots=True)
class Charge:
    first: Sample
    last: Sample
    stopped_since: int | None
    peak_kw: float
    metered_kwh: float
    mode: str | None


@dataclass(slots=True)
class DayTotals:
    """One local day's accumulators (SoC in percentage points, times in ms)."""

    date: str
    samples: int = 0
    distance_km: float = 0.0
    driving_ms: int = 0
    soc_used: float = 0.0
    soc_charged: float = 0.0
    soc_idle_drain: float = 0.0
    parked_ms: int = 0
    trips: int = 0
    charges: int = 0


@dataclass(slots=True)
class VehicleState:
    vin: str
    region: str
    time_zone: str
    capacity_kwh: float | None
    owner_id: str | None = None  # the owner the state aggregates for (None: nobody yet)
    period: int | None = None  # start of that owner's registration period
    buffer: list[Sample] = field(default_factory=list)  # reorder buffer, event-time order
    max_t: int | None = None  # newest event time accepted
    last: Sample | None = None  # last released sample of the current owner
    released: int | None = None  # newest event time released
    trip: Trip | None = None
    charge: Charge | None = None
    days: dict[str, DayTotals] = field(default_factory=dict)
    recent: list[str] = field(default_factory=list)  # upload ids, newest last
    version: int = 0
    applied: dict[str, int] = field(default_factory=dict)  # topic-partition -> last offset
    erased: dict[str, int] = field(default_factory=dict)  # owner -> erasure horizon (ms)
    touched: int | None = None  # newest reception time (ms), for expiry


# -- stored form -------------------------------------------------------------------

# The stored keys of a sample's fields, in Sample's field order: the stored form keeps
# the short keys vtp has always written.
_SAMPLE_KEYS = ("t", "seq", "v", "odo", "soc", "lat", "lon", "mv", "chg", "pw", "mode", "out")
assert len(_SAMPLE_KEYS) == len(Sample._fields)


def _sample_out(s: Sample) -> dict[str, Any]:
    return dict(zip(_SAMPLE_KEYS, s))  # noqa: B905 - lengths checked once, above


def _sample_in(d: dict[str, Any]) -> Sample:
    return tuple.__new__(Sample, map(d.__getitem__, _SAMPLE_KEYS))


def _trip_out(trip: Trip | None) -> dict[str, Any] | None:
    if trip is None:
        return None
    return {
        "first": _sample_out(trip.first),
        "last": _sample_out(trip.last),
        "parked_since": trip.parked_since,
        "max_v": trip.max_speed,
        "out_sum": trip.outside_sum,
        "out_n": trip.outside_n,
    }


def _trip_in(d: dict[str, Any] | None) -> Trip | None:
    if d is None:
        return None
    return Trip(
        _sample_in(d["first"]),
        _sample_in(d["last"]),
        d["parked_since"],
        d["max_v"],
        d["out_sum"],
        d["out_n"],
    )


def _charge_out(charge: Charge | None) -> dict[str, Any] | None:
    if charge is None:
        return None
    return {
        "first": _sample_out(charge.first),
        "last": _sample_out(charge.last),
        "stopped_since": charge.stopped_since,
        "peak": charge.peak_kw,
        "kwh": charge.metered_kwh,
        "mode": charge.mode,
    }


def _charge_in(d: dict[str, Any] | None) -> Charge | None:
    if d is None:
        return None
    return Charge(
        _sample_in(d["first"]),
        _sample_in(d["last"]),
        d["stopped_since"],
        d["peak"],
        d["kwh"],
        d["mode"],
    )


def _day_out(day: DayTotals) -> dict[str, Any]:
    return {name: getattr(day, name) for name in DayTotals.__slots__}


def to_json(state: VehicleState) -> bytes:
    stored: dict[str, Any] = {
        "vin": state.vin,
        "owner_id": state.owner_id,
        "region": state.region,
        "period": state.period,
        "tz": state.time_zone,
        "capacity": state.capacity_kwh,
        "buffer": [_sample_out(s) for s in state.buffer],
        "max_t": state.max_t,
        "last": _sample_out(state.last) if state.last else None,
        "released": state.released,
        "trip": _trip_out(state.trip),
        "charge": _charge_out(state.charge),
        "days": {date: _day_out(day) for date, day in state.days.items()},
        "recent": state.recent,
        "version": state.version,
        "applied": state.applied,
        "erased": state.erased,
        "touched": state.touched,
    }
    return json.dumps(stored, separators=(",", ":")).encode()


def from_json(raw: bytes | str) -> VehicleState:
    d = json.loads(raw)
    return VehicleState(
        vin=d["vin"],
        region=d["region"],
        time_zone=d["tz"],
        capacity_kwh=d["capacity"],
        owner_id=d["owner_id"],
        period=d["period"],
        buffer=[_sample_in(s) for s in d["buffer"]],
        max_t=d["max_t"],
        last=_sample_in(d["last"]) if d["last"] else None,
        released=d["released"],
        trip=_trip_in(d["trip"]),
        charge=_charge_in(d["charge"]),
        days={date: DayTotals(**day) for date, day in d["days"].items()},
        recent=d["recent"],
        version=d["version"],
        applied=d.get("applied") or {},
        erased=d.get("erased") or {},
        touched=d.get("touched"),
    )


def touched_of(raw: bytes) -> int | None:
    """When a stored state last heard from its vehicle, without decoding all of it."""
    touched = json.loads(raw).get("touched")
    return touched if isinstance(touched, int) else None

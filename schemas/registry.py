"""Vehicle registrations over time: which owner, in which region, from which moment. Pure.

A region's registry (its own compacted topic) holds per VIN the vehicle's history as
this region sees it: periods in this region carry the owner; a period elsewhere carries
only the other region's name, never its owner. Every sample belongs to the period in
force at its event time; a sale, a move and a deregistration each start a new period.
The worker, the aggregation and the sink all decide with these functions.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypedDict

from schemas.codec import FramingError, SchemaStore, default_store

SCHEMA_NAME = "vtp.registry.VehicleRegistration"
# ISO 3779: 17 characters, no I, O or Q. The SDK and the worker both check it.
VIN_PATTERN = re.compile(r"^[A-HJ-NPR-Z0-9]{17}$")


@dataclass(frozen=True)
class Period:
    from_ms: int
    owner_id: str | None  # None: no owner in this region from from_ms
    region: str | None  # None: deregistered

    def is_in(self, region: str) -> bool:
        return self.region == region and bool(self.owner_id)


@dataclass(frozen=True)
class Registration:
    vin: str
    periods: tuple[Period, ...]  # in time order; before the first, not registered
    model: str = ""
    battery_capacity_kwh: float | None = None
    time_zone: str = "UTC"
    revision: int = 0
    _starts: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        starts = tuple(p.from_ms for p in self.periods)
        if list(starts) != sorted(starts):
            raise ValueError(f"registration periods of {self.vin} are not in time order")
        object.__setattr__(self, "_starts", starts)

    def period_at(self, t_ms: int) -> Period | None:
        i = bisect.bisect_right(self._starts, t_ms) - 1
        return self.periods[i] if i >= 0 else None

    def end_of(self, period: Period) -> int | None:
        """When ``period`` ends: the next period's start, None while it lasts."""
        i = bisect.bisect_right(self._starts, period.from_ms)
        return self._starts[i] if i < len(self._starts) else None

    def here(self, region: str, t_ms: int) -> Period | None:
        """The period in force at ``t_ms`` if it registers the vehicle in ``region``."""
        period = self.period_at(t_ms)
        return period if period is not None and period.is_in(region) else None

    def owned_in(self, region: str, owner_id: str, start_ms: int, end_ms: int) -> bool:
        """Did ``owner_id`` hold the vehicle in ``region`` at some moment of [start, end]?"""
        for period in self.periods:
            if period.is_in(region) and period.owner_id == owner_id:
                end = self.end_of(period)
                if period.from_ms <= end_ms and (end is None or end > start_ms):
                    return True
        return False

    @property
    def current(self) -> Period | None:
        return self.periods[-1] if self.periods else None


def refusal(registration: Registration | None, region: str, t_ms: int) -> tuple[str, str] | None:
    """(reason, detail) when data about ``t_ms`` may not be stored in ``region``; else None."""
    if registration is None:
        return "unknown_vin", "not in this region's vehicle registry"
    period = registration.period_at(t_ms)
    if period is None:
        first = registration.periods[0].from_ms if registration.periods else None
        return "not_registered_yet", f"registered here from {first} (ms), not before"
    if period.region is None:
        return "deregistered", f"deregistered since {period.from_ms} (ms)"
    if period.region != region:
        return "registered_elsewhere", f"registered in {period.region} since {period.from_ms} (ms)"
    if not period.owner_id:
        return "deregistered", f"no owner since {period.from_ms} (ms)"
    return None


def view_for_region(
    vin: str,
    history: Iterable[Period],
    region: str,
    *,
    model: str = "",
    battery_capacity_kwh: float | None = None,
    time_zone: str = "UTC",
    revision: int = 0,
) -> Registration:
    """The registration ``region``'s registry holds: other regions' owners left out."""
    periods = tuple(
        p if p.region == region or p.region is None else Period(p.from_ms, None, p.region)
        for p in history
    )
    return Registration(vin, periods, model, battery_capacity_kwh, time_zone, revision)


class PeriodRecord(TypedDict):
    from_ms: int
    owner_id: str | None
    region: str | None


class RegistrationRecord(TypedDict):
    """A VehicleRegistration (newest version) as fastavro writes it."""

    vin: str
    owner_id: str
    region: str
    model: str
    battery_capacity_kwh: float | None
    time_zone: str
    revision: int
    periods: list[PeriodRecord]


def to_record(registration: Registration) -> RegistrationRecord:
    current = registration.current
    return {
        "vin": registration.vin,
        "owner_id": (current.owner_id or "") if current else "",
        "region": (current.region or "") if current else "",
        "model": registration.model,
        "battery_capacity_kwh": registration.battery_capacity_kwh,
        "time_zone": registration.time_zone,
        "revision": registration.revision,
        "periods": [
            {"from_ms": p.from_ms, "owner_id": p.owner_id, "region": p.region}
            for p in registration.periods
        ],
    }


def encode_registration(registration: Registration, store: SchemaStore | None = None) -> bytes:
    store = store or default_store()
    return store.encode(to_record(registration), store.get("VehicleRegistration"))


def decode_registration(data: bytes, store: SchemaStore | None = None) -> Registration:
    """Raises FramingError for bytes that are not a VehicleRegistration."""
    store = store or default_store()
    record, writer = store.decode(data)
    if writer.name != SCHEMA_NAME:
        raise FramingError("unexpected_schema", f"{writer.name} is not a VehicleRegistration")
    periods = tuple(
        Period(int(p["from_ms"]), p["owner_id"] or None, (p["region"] or "").lower() or None)
        for p in record.get("periods") or []
    )
    if not periods:  # v1: one registration from the beginning of time
        region = record["region"].lower() or None
        periods = (Period(0, record["owner_id"] or None, region),)
    try:
        return Registration(
            vin=record["vin"],
            periods=periods,
            model=record.get("model", ""),
            battery_capacity_kwh=record.get("battery_capacity_kwh"),
            time_zone=record.get("time_zone", "UTC"),
            revision=int(record.get("revision", 0)),
        )
    except ValueError as exc:
        raise FramingError("invalid_registration", str(exc)) from None

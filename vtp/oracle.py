"""The simulator's ground truth against what the warehouse holds: trips, charges, days.

Used by the integration tests (which assert the tolerances) and by `make bench` (which
prints the comparison table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from producers.simulator import GroundTruth
from vtp.core.warehouse import Warehouse, rows

TRIPS_SQL = """
SELECT vin, toUnixTimestamp64Milli(start_time), toUnixTimestamp64Milli(end_time), distance_km, energy_kwh
FROM trips FINAL WHERE vin IN {vins:Array(String)}
UNION ALL
SELECT vin, toUnixTimestamp64Milli(assumeNotNull(start_time)), toUnixTimestamp64Milli(assumeNotNull(end_time)),
       assumeNotNull(distance_km), energy_kwh
FROM open_sessions FINAL WHERE vin IN {vins:Array(String)} AND kind = 'trip' AND active
"""
CHARGES_SQL = """
SELECT vin, toUnixTimestamp64Milli(start_time), toUnixTimestamp64Milli(end_time), energy_added_kwh
FROM charges FINAL WHERE vin IN {vins:Array(String)}
UNION ALL
SELECT vin, toUnixTimestamp64Milli(assumeNotNull(start_time)), toUnixTimestamp64Milli(assumeNotNull(end_time)),
       energy_kwh
FROM open_sessions FINAL WHERE vin IN {vins:Array(String)} AND kind = 'charge' AND active
"""
DAYS_SQL = """
SELECT vin, toString(date), distance_km, energy_used_kwh, energy_charged_kwh, idle_drain_kwh, trips, charges
FROM daily_summaries FINAL WHERE vin IN {vins:Array(String)}
"""


def _rel(got: float | None, want: float, floor: float) -> float:
    """Relative error, with small truths judged against ``floor`` instead of zero."""
    return abs((got or 0.0) - want) / max(abs(want), floor)


@dataclass
class Comparison:
    vehicles: int = 0
    trips_expected: int = 0
    trips_found: int = 0
    charges_expected: int = 0
    charges_found: int = 0
    days_expected: int = 0
    days_found: int = 0
    max_trip_distance_error: float = 0.0
    max_trip_energy_error: float = 0.0
    max_charge_energy_error: float = 0.0
    max_day_distance_error: float = 0.0
    max_day_energy_error: float = 0.0
    max_start_end_offset_ms: int = 0
    day_count_mismatches: int = 0
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        return "\n".join(
            [
                (
                    "| vehicles | trips expected/found | charges expected/found | days expected/found "
                    "| max trip distance err | max trip energy err | max charge energy err "
                    "| max day distance err | max day energy err | max start/end offset |"
                ),
                "|---|---|---|---|---|---|---|---|---|---|",
                (
                    f"| {self.vehicles} | {self.trips_expected}/{self.trips_found} "
                    f"| {self.charges_expected}/{self.charges_found} | {self.days_expected}/{self.days_found} "
                    f"| {self.max_trip_distance_error:.3%} | {self.max_trip_energy_error:.3%} "
                    f"| {self.max_charge_energy_error:.3%} | {self.max_day_distance_error:.3%} "
                    f"| {self.max_day_energy_error:.3%} | {self.max_start_end_offset_ms / 1000:.0f} s |"
                ),
            ]
        )


def compare(warehouse: Warehouse, truth: GroundTruth, vins: list[str]) -> Comparison:
    params = {"vins": vins}
    trips: dict[str, list[tuple[Any, ...]]] = {}
    for vin, start, end, km, kwh in rows(warehouse.query(TRIPS_SQL, params)):
        trips.setdefault(vin, []).append((start, end, km, kwh))
    charges: dict[str, list[tuple[Any, ...]]] = {}
    for vin, start, end, kwh in rows(warehouse.query(CHARGES_SQL, params)):
        charges.setdefault(vin, []).append((start, end, kwh))
    days = {(vin, d): rest for vin, d, *rest in rows(warehouse.query(DAYS_SQL, params))}

    c = Comparison(vehicles=len(vins))
    for vin in vins:
        t = truth.vehicles[vin]
        found = sorted(trips.get(vin, []))
        c.trips_expected += len(t.trips)
        c.trips_found += len(found)
        if len(found) != len(t.trips):
            c.problems.append(f"{vin}: {len(t.trips)} trips expected, {len(found)} found")
        else:
            for (start, end, km, kwh), want in zip(found, t.trips, strict=True):
                c.max_start_end_offset_ms = max(
                    c.max_start_end_offset_ms, abs(start - want.start_ms), abs(end - want.end_ms)
                )
                c.max_trip_distance_error = max(
                    c.max_trip_distance_error, _rel(km, want.distance_km, 1.0)
                )
                c.max_trip_energy_error = max(
                    c.max_trip_energy_error, _rel(kwh, want.energy_kwh, 1.0)
                )
        found_charges = sorted(charges.get(vin, []))
        c.charges_expected += len(t.charges)
        c.charges_found += len(found_charges)
        if len(found_charges) != len(t.charges):
            c.problems.append(
                f"{vin}: {len(t.charges)} charges expected, {len(found_charges)} found"
            )
        else:
            for (_, _, kwh), want_charge in zip(found_charges, t.charges, strict=True):
                c.max_charge_energy_error = max(
                    c.max_charge_energy_error, _rel(kwh, want_charge.energy_kwh, 1.0)
                )
        for date, want_day in t.daily().items():
            c.days_expected += 1
            got = days.get((vin, date))
            if got is None:
                c.problems.append(f"{vin}: no summary for {date}")
                continue
            c.days_found += 1
            km, used, charged, drain, n_trips, n_charges = got
            c.max_day_distance_error = max(
                c.max_day_distance_error, _rel(km, want_day.get("distance_km", 0.0), 1.0)
            )
            for value, key in (
                (used, "energy_used_kwh"),
                (charged, "energy_charged_kwh"),
                (drain, "idle_drain_kwh"),
            ):
                c.max_day_energy_error = max(
                    c.max_day_energy_error, _rel(value, want_day.get(key, 0.0), 1.0)
                )
            if (n_trips, n_charges) != (want_day.get("trips", 0), want_day.get("charges", 0)):
                c.day_count_mismatches += 1
                c.problems.append(
                    f"{vin} {date}: trips/charges {(n_trips, n_charges)} != {(want_day.get('trips', 0), want_day.get('charges', 0))}"
                )
    return c

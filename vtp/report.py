"""What an owner sees first: per vehicle, samples, time span, distance, battery."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vtp.core.warehouse import Warehouse, rows


@dataclass(frozen=True)
class VehicleSummary:
    vin: str
    samples: int
    uploads: int
    first: datetime
    last: datetime
    distance_km: float  # odometer at the last sample minus at the first
    latest_soc: float | None
    dtcs: int


class UnknownOwner(LookupError):
    pass


def owner_report(warehouse: Warehouse, owner_id: str) -> list[VehicleSummary]:
    """Read only the owner's slice (owner_id leads the primary key)."""
    result = warehouse.query(
        """
        SELECT vin, count(), uniqExact(upload_id), min(event_time), max(event_time),
               argMaxIf(odometer, event_time, odometer IS NOT NULL)
                 - argMinIf(odometer, event_time, odometer IS NOT NULL),
               argMaxIf(soc, event_time, soc IS NOT NULL),
               countIf(notEmpty(dtcs))
        FROM samples
        WHERE owner_id = {owner:String}
        GROUP BY vin
        ORDER BY vin
        """,
        {"owner": owner_id},
    )
    found = [
        VehicleSummary(vin, n, ups, first, last, float(dist or 0.0), soc, dtcs)
        for vin, n, ups, first, last, dist, soc, dtcs in rows(result)
    ]
    if not found:
        raise UnknownOwner(f"no data for owner {owner_id!r} in {warehouse.description}")
    return found


def format_report(owner_id: str, region: str, vehicles: list[VehicleSummary]) -> str:
    lines = [f"Owner {owner_id} (region {region}): {len(vehicles)} vehicle(s)"]
    for v in vehicles:
        soc = f"{v.latest_soc:.1f} %" if v.latest_soc is not None else "unknown"
        lines.append(
            f"  {v.vin}  {v.samples:>6} samples in {v.uploads} uploads  "
            f"{v.first:%Y-%m-%d %H:%M:%S} .. {v.last:%H:%M:%S} UTC  "
            f"driven {v.distance_km:8.3f} km  battery {soc}  dtc events {v.dtcs}"
        )
    return "\n".join(lines)


def recent_trips(warehouse: Warehouse, owner_id: str, limit: int = 10) -> list[tuple[Any, ...]]:
    """Closed trips and the trip each vehicle is on now ("open"), newest first."""
    return rows(
        warehouse.query(
            """
            SELECT vin, start_time, end_time, distance_km, duration_s, max_speed_kmh, energy_kwh, state
            FROM (
                SELECT vin, start_time, end_time, distance_km, duration_s, max_speed_kmh, energy_kwh,
                       'done' AS state
                FROM trips FINAL WHERE owner_id = {owner:String}
                UNION ALL
                SELECT vin, assumeNotNull(start_time), assumeNotNull(end_time),
                       assumeNotNull(distance_km), dateDiff('second', start_time, end_time),
                       JSONExtractFloat(record, 'max_speed_kmh'), energy_kwh, 'open'
                FROM open_sessions FINAL
                WHERE owner_id = {owner:String} AND kind = 'trip' AND active
            )
            ORDER BY start_time DESC, state
            LIMIT 1 BY vin, start_time
            LIMIT {limit:UInt32}
            """,
            {"owner": owner_id, "limit": limit},
        )
    )


def recent_charges(warehouse: Warehouse, owner_id: str, limit: int = 5) -> list[tuple[Any, ...]]:
    return rows(
        warehouse.query(
            """
            SELECT vin, start_time, end_time, start_soc, end_soc, energy_added_kwh, peak_power_kw, mode, state
            FROM (
                SELECT vin, start_time, end_time, start_soc, end_soc, energy_added_kwh, peak_power_kw, mode,
                       'done' AS state
                FROM charges FINAL WHERE owner_id = {owner:String}
                UNION ALL
                SELECT vin, assumeNotNull(start_time), assumeNotNull(end_time), start_soc, end_soc,
                       energy_kwh, JSONExtractFloat(record, 'peak_power_kw'),
                       JSONExtractString(record, 'mode'), 'open'
                FROM open_sessions FINAL
                WHERE owner_id = {owner:String} AND kind = 'charge' AND active
            )
            ORDER BY start_time DESC, state
            LIMIT 1 BY vin, start_time
            LIMIT {limit:UInt32}
            """,
            {"owner": owner_id, "limit": limit},
        )
    )


def last_days(warehouse: Warehouse, owner_id: str, days: int = 7) -> list[tuple[Any, ...]]:
    """Per vehicle and local day, the owner's last ``days`` days with data."""
    return rows(
        warehouse.query(
            """
            SELECT date, vin, distance_km, driving_s, energy_used_kwh, energy_charged_kwh,
                   efficiency_wh_per_km, trips, charges, idle_drain_kwh, final
            FROM daily_summaries FINAL
            WHERE owner_id = {owner:String}
              AND date >= (SELECT max(date) FROM daily_summaries WHERE owner_id = {owner:String})
                          - toIntervalDay({days:UInt32} - 1)
            ORDER BY date DESC, vin
            """,
            {"owner": owner_id, "days": days},
        )
    )


def _num(value: object, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def format_activity(
    trips: list[tuple[Any, ...]], charges: list[tuple[Any, ...]], days: list[tuple[Any, ...]]
) -> str:
    lines = ["  Recent trips:"] if trips else ["  Recent trips: none yet"]
    for vin, start, end, km, seconds, vmax, kwh, state in trips:
        lines.append(
            f"    {vin}  {start:%Y-%m-%d %H:%M} -> {end:%H:%M} UTC  {km:7.2f} km  {seconds / 60:5.1f} min  "
            f"max {_num(vmax, '.0f', ' km/h')}  {_num(kwh, '.2f', ' kWh')}{'  (ongoing)' if state == 'open' else ''}"
        )
    lines.append("  Recent charges:" if charges else "  Recent charges: none yet")
    for vin, start, end, soc0, soc1, kwh, peak, mode, state in charges:
        lines.append(
            f"    {vin}  {start:%Y-%m-%d %H:%M} -> {end:%H:%M} UTC  SoC {_num(soc0, '.1f')} -> {_num(soc1, '.1f')} %  "
            f"{_num(kwh, '.2f', ' kWh')}  peak {_num(peak, '.0f', ' kW')}  {mode or ''}"
            f"{'  (charging)' if state == 'open' else ''}"
        )
    lines.append(
        "  Last 7 days (local time of the vehicle's region):" if days else "  Last 7 days: no data"
    )
    for date, vin, km, drive_s, used, charged, whkm, n_trips, n_charges, drain, final in days:
        lines.append(
            f"    {date}  {vin}  {km:7.2f} km  driving {drive_s / 3600:4.1f} h  used {_num(used, '.2f', ' kWh')}  "
            f"charged {_num(charged, '.2f', ' kWh')}  {_num(whkm, '.0f', ' Wh/km')}  trips {n_trips}  "
            f"charges {n_charges}  idle drain {_num(drain, '.2f', ' kWh')}{'' if final else '  (so far)'}"
        )
    return "\n".join(lines)

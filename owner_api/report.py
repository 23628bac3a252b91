"""What an owner sees first: per vehicle, samples, time span, distance, battery."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sinks.warehouse import Warehouse, rows


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

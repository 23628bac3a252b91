"""Publish a simulated fleet: registry entries, then every upload, as fast as the
producer takes them. Used by `vtp simulate`, the demo, the tests and the benchmark.

Each vehicle is provisioned with its region's endpoint: its uploads go to the cluster
of the region it is registered in (a moved vehicle sends what it holds to the old region
and switches at the move), and each region's registry receives only that region's view
of its vehicles. A vehicle given an uplink (producers/uplink.py) sends through its
region's gateway instead; the others publish straight to Kafka, as trusted in-region
producers do.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from producers.sdk import DeliveryReport, TelemetryPublisher, publish_registrations
from producers.simulator import GroundTruth, Vehicle, build_fleet, new_truth, simulate
from vtp.core.regions import REGIONS
from vtp.core.settings import Settings
from vtp.core.topics import check_cluster_region

# A fixed start keeps test runs identical; vehicles may upload old data (store-and-
# forward), so a past start is valid input. `vtp simulate` and the demo end now instead,
# so what they publish is in the owner API's default window (the last 30 days).
DEFAULT_START_MS = 1793944800000  # 2026-11-06T06:00:00Z


class Uplink(Protocol):
    """What carries one vehicle's uploads to its region's gateway: a VehicleUplink."""

    def send_encoded(self, upload_id: str, value: bytes) -> int: ...


def ending_now(duration_s: float) -> int:
    """A start (to the minute) from which a simulation of ``duration_s`` ends now."""
    return (int(time.time() * 1000) - int(duration_s * 1000)) // 60_000 * 60_000


@dataclass
class PublishSummary:
    vehicles: list[Vehicle]
    truth: GroundTruth
    uploads: int = 0
    samples: int = 0
    seconds: float = 0.0
    report: DeliveryReport = field(default_factory=DeliveryReport)
    # The first upload of each vehicle as (key, value): what a resend test sends again.
    first_uploads: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    uploads_by_region: Counter[str | None] = field(default_factory=Counter)
    # Of those, the uploads handed to an uplink (the region's gateway), by region.
    via_gateway: Counter[str | None] = field(default_factory=Counter)
    vehicles_sent: set[str] = field(default_factory=set)
    # Uploads of vehicles provisioned with a region that is not running here.
    unsent: int = 0
    # With collect_positions: every latitude/longitude sent, by the region it went to.
    positions: dict[str, set[float]] = field(default_factory=dict)

    def __str__(self) -> str:
        rate = self.samples / self.seconds if self.seconds else 0.0
        return (
            f"published {self.uploads} uploads / {self.samples} samples of "
            f"{len(self.vehicles_sent)} vehicles in {self.seconds:.1f} s ({rate:,.0f} samples/s); "
            f"delivered {self.report.delivered}, failed {len(self.report.failed)}, "
            f"pending {self.report.pending}"
        )


def register_fleet(settings: Settings, vehicles: list[Vehicle]) -> DeliveryReport:
    """Write the region's view of every vehicle ever registered there to its registry."""
    region = settings.need_region()
    check_cluster_region(settings)
    report = publish_registrations(
        settings.bootstrap(),
        settings.topics.vehicles,
        [v.registration_in(region) for v in vehicles if region in v.regions],
        settings.kafka_extra,
    )
    if not report.ok:
        raise RuntimeError(f"registry entries not delivered: {report.failed[:3]}")
    return report


def publishers_for(stacks: dict[str, Settings]) -> dict[str, TelemetryPublisher]:
    return {
        region: TelemetryPublisher(s.bootstrap(), s.topics.uploads, kafka_extra=s.kafka_extra)
        for region, s in stacks.items()
    }


def flush_all(publishers: dict[str, TelemetryPublisher], timeout: float = 60.0) -> DeliveryReport:
    total = DeliveryReport()
    for publisher in publishers.values():
        report = publisher.flush(timeout)
        total.delivered += report.delivered
        total.failed += report.failed
        total.pending += report.pending
    return total


def publish_fleet(
    stacks: Settings | dict[str, Settings],
    vehicles: list[Vehicle],
    *,
    seed: int,
    duration_s: float,
    start_ms: int = DEFAULT_START_MS,
    publishers: dict[str, TelemetryPublisher] | None = None,
    collect_positions: bool = False,
    uplinks: Mapping[str, Uplink] | None = None,
    **simulate_options: Any,
) -> PublishSummary:
    """Simulate ``vehicles`` and send each upload to the region it is provisioned with;
    given ``publishers``, the caller flushes them. A vehicle in ``uplinks`` (by VIN) sends
    through its uplink instead, which must lead to that region's gateway; the caller
    waits for the uplinks' acknowledgements."""
    if isinstance(stacks, Settings):
        stacks = {stacks.need_region(): stacks}
    for settings in stacks.values():
        check_cluster_region(settings)
    own = publishers is None
    publishers = publishers if publishers is not None else publishers_for(stacks)
    by_vin = {v.vin: v for v in vehicles}
    summary = PublishSummary(vehicles=vehicles, truth=new_truth(vehicles))
    started = time.perf_counter()
    for upload in simulate(
        vehicles,
        seed=seed,
        start_ms=start_ms,
        duration_s=duration_s,
        truth=summary.truth,
        **simulate_options,
    ):
        region = by_vin[upload["vin"]].endpoint_at(upload["samples"][-1]["event_time_ms"])
        publisher = publishers.get(region or "")
        if publisher is None:
            summary.unsent += 1
            continue
        if collect_positions:
            summary.positions.setdefault(region or "", set()).update(
                x for s in upload["samples"] for x in (s["latitude"], s["longitude"])
            )
        value = publisher.encode(upload)
        key = upload["vin"].encode()
        summary.first_uploads.setdefault(upload["vin"], (key, value))
        uplink = uplinks.get(upload["vin"]) if uplinks else None
        if uplink is not None:
            uplink.send_encoded(upload["upload_id"], value)
            summary.via_gateway[region] += 1
        else:
            publisher.publish_raw(key, value, upload["upload_id"])
        summary.uploads += 1
        summary.samples += len(upload["samples"])
        summary.uploads_by_region[region] += 1
        summary.vehicles_sent.add(upload["vin"])
    summary.report = flush_all(publishers) if own else DeliveryReport()
    summary.seconds = time.perf_counter() - started
    return summary


def publish_simulation(
    settings: Settings,
    *,
    seed: int,
    owners: int,
    vehicles: int,
    duration_s: float,
    register: bool = True,
) -> PublishSummary:
    """`vtp simulate`: the whole fleet is simulated (it is deterministic), and the
    vehicles provisioned with this region are registered and published here."""
    fleet = build_fleet(seed, owners=owners, vehicles=vehicles, regions=tuple(REGIONS))
    if register:
        register_fleet(settings, fleet)
    return publish_fleet(
        settings, fleet, seed=seed, duration_s=duration_s, start_ms=ending_now(duration_s)
    )

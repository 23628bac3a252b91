"""Publish a simulated fleet: registry entries, then every upload, as fast as the
producer takes them. Used by `vtp simulate`, the demo, the tests and the benchmark."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from producers.sdk import DeliveryReport, TelemetryPublisher, publish_registrations
from producers.simulator import GroundTruth, Vehicle, build_fleet, new_truth, simulate
from vtp.settings import Settings

# A fixed start keeps runs identical; vehicles may upload old data (store-and-forward),
# so a past start is valid input.
DEFAULT_START_MS = 1793944800000  # 2026-11-06T06:00:00Z


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

    def __str__(self) -> str:
        rate = self.samples / self.seconds if self.seconds else 0.0
        return (
            f"published {self.uploads} uploads / {self.samples} samples of "
            f"{len(self.vehicles)} vehicles in {self.seconds:.1f} s ({rate:,.0f} samples/s); "
            f"delivered {self.report.delivered}, failed {len(self.report.failed)}, "
            f"pending {self.report.pending}"
        )


def register_fleet(settings: Settings, vehicles: list[Vehicle]) -> DeliveryReport:
    report = publish_registrations(
        settings.bootstrap(),
        settings.topics.vehicles,
        [v.registration() for v in vehicles],
        settings.kafka_extra,
    )
    if not report.ok:
        raise RuntimeError(f"registry entries not delivered: {report.failed[:3]}")
    return report


def publish_fleet(
    settings: Settings,
    vehicles: list[Vehicle],
    *,
    seed: int,
    duration_s: float,
    start_ms: int = DEFAULT_START_MS,
    publisher: TelemetryPublisher | None = None,
    **simulate_options,
) -> PublishSummary:
    own = publisher is None
    publisher = publisher or TelemetryPublisher(
        settings.bootstrap(), settings.topics.uploads, kafka_extra=settings.kafka_extra
    )
    summary = PublishSummary(vehicles=vehicles, truth=new_truth(vehicles))
    store = publisher._store
    schema = publisher._schema
    started = time.perf_counter()
    for upload in simulate(
        vehicles, seed=seed, start_ms=start_ms, duration_s=duration_s, truth=summary.truth,
        **simulate_options,
    ):  # fmt: skip
        value = store.encode(upload, schema)
        key = upload["vin"].encode()
        summary.first_uploads.setdefault(upload["vin"], (key, value))
        publisher.publish_raw(key, value, upload["upload_id"])
        summary.uploads += 1
        summary.samples += len(upload["samples"])
    summary.report = publisher.flush(60) if own else publisher.report
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
    fleet = build_fleet(seed, owners=owners, vehicles=vehicles, regions=settings.regions)
    if register:
        register_fleet(settings, fleet)
    return publish_fleet(settings, fleet, seed=seed, duration_s=duration_s)

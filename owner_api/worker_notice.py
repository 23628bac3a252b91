"""Telling the region's worker that an owner erased, so its session state forgets them.

The worker keeps per-vehicle state (open trips, days, last positions) in changelog-backed
tables keyed by VIN. An erasure is by owner, so the job finds the owner's vehicles (those
with stored uploads, and every vehicle the registry ever gave the owner in this region)
and sends one control message per vehicle to the region's control topic, keyed by VIN:
it reaches the worker that holds the vehicle's state (the topic is partitioned as the
uploads are). The state remembers the erasure's horizon, so an upload of the erased time
that the worker meets later (a replay, a late delivery) is not taken in again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas.registry import Registration
from vtp.core import headers as h
from vtp.core.kafka import producer_config
from vtp.core.registry_copy import RegistryCopy
from vtp.core.settings import Settings


def vehicles_of(owner: str, region: str, registry: Mapping[str, Registration]) -> set[str]:
    """VINs the registry gave ``owner`` in ``region`` at any time."""
    return {
        vin
        for vin, reg in registry.items()
        if any(p.owner_id == owner and p.region == region for p in reg.periods)
    }


# Bytes values, typed as Producer.produce takes headers (a list, so invariant).
def erasure_message(owner: str, horizon_ms: int) -> list[tuple[str, str | bytes | None]]:
    return [
        (h.CONTROL, h.ERASURE_CONTROL),
        (h.ERASED_OWNER, owner.encode()),
        (h.ERASURE_HORIZON_MS, str(horizon_ms).encode()),
    ]


class WorkerNotice:
    def __init__(self, settings: Settings):
        self._settings = settings

    def registry_vehicles(self, owner: str) -> set[str]:
        """The owner's vehicles in the registry topic as it is now (read once, whole)."""
        copy = RegistryCopy(self._settings)
        try:
            copy.start()
            return vehicles_of(owner, self._settings.need_region(), copy)
        finally:
            copy.close()

    def send(self, owner: str, horizon_ms: int, vins: Iterable[str]) -> int:
        """One control message per VIN, all acknowledged before this returns (raises
        otherwise: the job tries again). Returns the number sent."""
        settings = self._settings
        producer = Producer(producer_config(settings.bootstrap(), settings.kafka_extra))
        failed: list[str] = []
        vins = sorted(set(vins))
        headers = erasure_message(owner, horizon_ms)

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failed.append(str(err))

        for vin in vins:
            producer.produce(
                settings.topics.control, b"", vin.encode(), headers=headers, on_delivery=delivered
            )
            producer.poll(0)
        left = producer.flush(30)
        if left or failed:
            raise KafkaException(
                f"erasure notice to the worker: {left} not delivered, {len(failed)} failed"
                + (f" ({failed[0]})" if failed else "")
            )
        return len(vins)

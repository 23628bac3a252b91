"""Bad input, made on purpose: each message with the outcome the pipeline owes it.

The demo and the integration tests publish these next to a simulated fleet and
check that every one lands where it should, with its reason.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass

from schemas import SchemaStore, default_store


@dataclass(frozen=True)
class Fault:
    key: bytes | None
    value: bytes
    destination: str  # "deadletter" or "quarantine"
    reason: str
    # The producer's own timestamp (a gateway's clock); the uploads topic replaces it
    # with the broker's time of arrival.
    created_ms: int | None = None


def _upload(
    vin: str, rng: random.Random, sent_at_ms: int, **sample_overrides: object
) -> dict[str, object]:
    sample: dict[str, object] = {
        "event_time_ms": sent_at_ms - 1000,
        "seq": 1,
        "speed": 50.0,
        "latitude": 52.52,
        "longitude": 13.405,
        "heading": 90.0,
        "odometer": 1234.5,
        "soc": 80.0,
        "is_charging": False,
        "charge_power": None,
        "charge_mode": None,
        "battery_temperature": 25.0,
        "outside_temperature": 10.0,
        "gear": "DRIVE",
        "dtcs": [],
    }
    sample.update(sample_overrides)
    return {
        "vin": vin,
        "upload_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "sent_at_ms": sent_at_ms,
        "gateway_firmware": "3.2.1",
        "samples": [sample],
    }


def fault_messages(
    registered_vin: str,
    unregistered_vin: str,
    resend: tuple[bytes, bytes],
    sent_at_ms: int,
    seed: int = 1,
    store: SchemaStore | None = None,
) -> list[Fault]:
    """One of each kind of bad input. ``resend`` is (key, value) of a real upload."""
    store = store or default_store()
    rng = random.Random(seed)
    v1 = store.get("VehicleUpload", 1)
    good = store.encode(_upload(registered_vin, rng, sent_at_ms), v1)
    bad_speed = store.encode(_upload(registered_vin, rng, sent_at_ms, speed=999.0), v1)
    future = store.encode(_upload(registered_vin, rng, sent_at_ms + 86_400_000 * 365 * 20), v1)
    # A gateway whose clock runs a day ahead: its sent_at, samples and message timestamp
    # all agree with one another, and only the broker's clock tells.
    ahead_ms = int(time.time() * 1000) + 86_400_000
    ahead = store.encode(_upload(registered_vin, rng, ahead_ms), v1)
    unkeyed = store.encode(_upload(registered_vin, rng, sent_at_ms), v1)
    unknown_fp = b"\xc3\x01" + bytes(8) + good[10:]
    return [
        Fault(registered_vin.encode(), rng.randbytes(64), "deadletter", "not_single_object"),
        Fault(registered_vin.encode(), good[: len(good) // 2], "deadletter", "malformed_avro"),
        Fault(registered_vin.encode(), unknown_fp, "deadletter", "unknown_schema"),
        Fault(registered_vin.encode(), bad_speed, "deadletter", "invalid_sample"),
        Fault(registered_vin.encode(), future, "deadletter", "clock_skew"),
        Fault(registered_vin.encode(), ahead, "deadletter", "clock_skew", created_ms=ahead_ms),
        Fault(None, unkeyed, "deadletter", "missing_key"),
        Fault(resend[0], resend[1], "deadletter", "duplicate_upload"),
        Fault(
            unregistered_vin.encode(),
            store.encode(_upload(unregistered_vin, rng, sent_at_ms), v1),
            "quarantine",
            "unknown_vin",
        ),
    ]

"""Erasure notices reach the worker's session state even for a vehicle whose state was
never checkpointed (its uploads are read again after a restart, after the notice)."""

from __future__ import annotations

import asyncio

import faust

from schemas.registry import Period, Registration
from stream_jobs import aggregate, session_state
from vtp.core import headers as h
from vtp.core.settings import load_settings

VIN = "WVWZZZ1JZNOTICE01"


def _notice(key: bytes, owner: str = "owner-1", horizon: int = 1_800_000_000_000):
    return (
        key,
        [
            (h.CONTROL, h.ERASURE_CONTROL),
            (h.ERASED_OWNER, owner.encode()),
            (h.ERASURE_HORIZON_MS, str(horizon).encode()),
        ],
    )


def test_a_notice_for_a_registered_vehicle_with_no_state_yet_records_the_horizon(monkeypatch):
    written: dict[bytes, bytes | None] = {}

    async def put(table, key, value, partition=None) -> None:
        written[key] = value

    monkeypatch.setattr(aggregate, "put_durably", put)
    registry = {VIN: Registration(VIN, (Period(0, "owner-1", "eu"),), "Model Y", 60.0)}

    async def send(*_):
        raise AssertionError("nothing is emitted for an erasure")

    async def scenario() -> None:
        app = faust.App("test-notices", broker="kafka://127.0.0.1:9", store="memory://")
        sessions = aggregate.Sessions(app, load_settings({"VTP_REGION": "eu"}), registry.get, send)
        await sessions.take_notices(
            [
                _notice(VIN.encode()),
                _notice(b"LRW3E7EK4NC000404"),  # no vehicle of this region
                _notice(b"\xff\xfe not text"),  # a forged key
            ]
        )

    asyncio.run(scenario())
    assert list(written) == [VIN.encode()]
    state = session_state.from_json(written[VIN.encode()] or b"")
    assert state.erased == {"owner-1": 1_800_000_000_000}

"""The worker's per-vehicle state stays bounded and keeps nothing of an erased owner.

One region stack (worker and `vtp serve`) on one partition, with a short state TTL and a
changelog compaction lag of a second, and a vehicle that keeps sending throughout (its
state writes are what make Kafka roll and compact the changelog, as traffic does in a
real region). Read through the real changelog topics and the owner API.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from owner_api.tokens import issue, owner_claims
from producers.sdk import TelemetryPublisher, publish_registrations
from schemas.registry import Period, Registration
from vtp.core.keys import load_keyring
from vtp.harness import start_serve, start_worker
from vtp.serve import wait_for_service

pytestmark = pytest.mark.e2e

BUSY, QUIET, ERASING = "WVWZZZ1JZBUSY0001", "WVWZZZ1JZSLEEP001", "WVWZZZ1JZERASE001"
OWNER = {BUSY: "owner-busy", QUIET: "owner-quiet", ERASING: "owner-erasing"}
ERASED_LATITUDE = 48.123456  # only in the erasing owner's drive before the erasure


def _now_ms() -> int:
    return int(time.time() * 1000)


def _upload(vin: str, start_ms: int, n: int, driving: bool, lat: float, seq0: int) -> dict:
    samples = [
        {
            "event_time_ms": start_ms + i * 1000,
            "seq": seq0 + i,
            "speed": 36.0 if driving else 0.0,
            "latitude": lat,
            "longitude": 11.6,
            "heading": 0.0,
            "odometer": 20_000.0 + (0.01 * i if driving else 0.0),
            "soc": 60.0,
            "is_charging": False,
            "charge_power": None,
            "charge_mode": None,
            "battery_temperature": 20.0,
            "outside_temperature": 8.0,
            "gear": "DRIVE" if driving else "PARK",
            "dtcs": [],
        }
        for i in range(n)
    ]
    return {
        "vin": vin,
        "upload_id": str(uuid.uuid4()),
        "sent_at_ms": samples[-1]["event_time_ms"],
        "gateway_firmware": "3.2.1",
        "samples": samples,
    }


class Heartbeat(threading.Thread):
    """A parked vehicle (or more) sending a sample every half second."""

    def __init__(self, settings, vins: list[str]):
        super().__init__(daemon=True)
        self.publisher = TelemetryPublisher(settings.bootstrap(), settings.topics.uploads)
        self.vins, self.stopping, self.seq = vins, threading.Event(), 1_000_000

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            for vin in self.vins:
                self.seq += 1
                self.publisher.publish_upload(_upload(vin, _now_ms(), 1, False, 48.5, self.seq))
            self.publisher.flush(10)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        self.publisher.flush(30)
        del self.publisher  # no client of the broker outlives it


@pytest.fixture(scope="module")
def stack(region_stack):
    settings = region_stack(
        "eu",
        "state",
        topic_partitions=1,
        changelog_compaction_lag_s=1.0,
        vehicle_state_ttl_s=12.0,
        max_backlog_s=10.0,
        max_clock_skew_s=2.0,
        trip_gap_s=60.0,
        charge_gap_s=60.0,
        allowed_lateness_s=2.0,
        sink_batch_messages=200,
        sink_flush_ms=300,
    )
    report = publish_registrations(
        settings.bootstrap(),
        settings.topics.vehicles,
        [
            Registration(vin, (Period(0, owner, "eu"),), "Model Y", 60.0, "Europe/Berlin", 1)
            for vin, owner in OWNER.items()
        ],
    )
    assert report.ok
    worker, serve = start_worker(settings), start_serve(settings)
    heartbeat = None
    try:
        url = wait_for_service(settings, serve)
        heartbeat = Heartbeat(settings, [BUSY, ERASING])
        heartbeat.start()
        yield {"settings": settings, "url": url, "ring": load_keyring(settings)}
    finally:
        if heartbeat:
            heartbeat.stop()
        worker.stop()
        serve.stop()


def _changelog(settings, table: str) -> str:
    return f"{settings.topics.worker_app}-{table}-changelog"


def _read_all(settings, topic: str) -> list[tuple[bytes, bytes | None]]:
    """Every (key, value) the topic holds now, in order (partition 0: one partition)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap(),
            "group.id": "observer",
            "enable.auto.commit": False,
        }
    )
    try:
        if topic not in consumer.list_topics(timeout=10).topics:
            return []  # the worker has not made it yet
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, low)])
        found: list[tuple[bytes, bytes | None]] = []
        last = low - 1
        deadline = time.monotonic() + 60
        while last + 1 < high and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=1.0):
                if not m.error():
                    found.append((m.key(), m.value()))
                    last = m.offset()
        return found
    finally:
        consumer.close()


def _latest(settings, table: str, vin: str) -> tuple[bool, bytes | None]:
    """(ever written, the latest value) of the VIN's entry in a worker table's changelog."""
    values = [v for k, v in _read_all(settings, _changelog(settings, table)) if k == vin.encode()]
    return bool(values), (values[-1] if values else None)


def _until(what, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)


def _api(stack, owner: str) -> httpx.Client:
    token = issue(stack["ring"], owner_claims(owner, "eu", 600))
    return httpx.Client(
        base_url=stack["url"], headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def test_a_vehicle_gone_quiet_is_forgotten_after_its_sessions_close(stack):
    settings = stack["settings"]
    start = _now_ms() - 5000
    publisher = TelemetryPublisher(settings.bootstrap(), settings.topics.uploads)
    publisher.publish_upload(_upload(QUIET, start, 5, True, 48.2, 1))  # a trip, then silence
    assert publisher.flush(30).ok
    assert _until(lambda: _latest(settings, "vehicle_sessions", QUIET)[1] is not None, 60)

    # After the TTL (12 s) the sweep closes its trip final and removes both entries.
    def forgotten() -> bool:
        return all(
            _latest(settings, table, QUIET) == (True, None)
            for table in ("vehicle_sessions", "seen_uploads")
        )

    assert _until(forgotten, 90), "the quiet vehicle's worker state was not removed"
    with _api(stack, OWNER[QUIET]) as api:
        trips = _until(lambda: api.get("/v1/trips", params={"vin": QUIET}).json()["trips"], 30)
    assert [(t["start_time"][:19], t["end_time"][:19]) for t in trips] == [
        (_iso(start), _iso(start + 4000))
    ]
    # the vehicle that kept sending was kept
    assert _latest(settings, "vehicle_sessions", BUSY)[1] is not None

    # back after being forgotten: a new state, new data stored
    publisher.publish_upload(_upload(QUIET, _now_ms(), 3, False, 48.2, 100))
    assert publisher.flush(30).ok
    assert _until(lambda: _latest(settings, "vehicle_sessions", QUIET)[1] is not None, 60)


def test_an_erased_owner_leaves_the_worker_state_and_then_kafka(stack):
    settings = stack["settings"]
    publisher = TelemetryPublisher(settings.bootstrap(), settings.topics.uploads)
    publisher.publish_upload(_upload(ERASING, _now_ms() - 3000, 3, True, ERASED_LATITUDE, 1))
    assert publisher.flush(30).ok
    marker = str(ERASED_LATITUDE).encode()
    held = _until(lambda: marker in (_latest(settings, "vehicle_sessions", ERASING)[1] or b""), 60)
    assert held, "the drive never reached the worker's state"

    with _api(stack, OWNER[ERASING]) as api:
        erasure_id = api.post("/v1/erasure").json()["erasure"]["erasure_id"]
        done = _until(
            lambda: (
                api.get(f"/v1/erasures/{erasure_id}").json()["erasure"]["status"] == "completed"
            ),
            60,
            0.5,
        )
        assert done

    # The worker rewrote the vehicle's state without the owner's erased time ...
    def scrubbed() -> dict | None:
        value = _latest(settings, "vehicle_sessions", ERASING)[1]
        state = json.loads(value) if value else {}
        return state if OWNER[ERASING] in state.get("erased", {}) else None

    state = _until(scrubbed, 60)
    assert state, "the erasure never reached the worker"
    assert marker not in json.dumps(state).encode()
    assert state["trip"] is None  # the drive was the owner's erased past
    # ... and Kafka's compaction then dropped every earlier value that held it.
    changelog = _changelog(settings, "vehicle_sessions")

    def compacted() -> bool:
        return not [v for _, v in _read_all(settings, changelog) if v and marker in v]

    assert _until(compacted, 150, 2.0), "the erased owner's state is still in the changelog"
    # the owner's data after the erasure (the heartbeat, parked) is aggregated as new
    assert _until(
        lambda: (
            json.loads(_latest(settings, "vehicle_sessions", ERASING)[1]).get("owner_id")
            == OWNER[ERASING]
        ),
        60,
    )


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000))

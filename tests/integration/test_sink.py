"""The sink in-process against the real broker and the real engine: a crash between
inserting a batch's samples and its uploads, then a restart, leaves exact rows; an
upload that spans a sale is split between the two owners."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from confluent_kafka import Producer

from producers.publish import DEFAULT_START_MS, register_fleet
from producers.simulator import build_fleet, new_truth, simulate
from schemas import default_store
from schemas.registry import Period
from sinks.sink import RegionSink
from vtp.core.warehouse import ChdbWarehouse, WarehouseError, rows
from vtp.harness import group_position

pytestmark = pytest.mark.integration


class SimulatedCrash(Exception):
    """The process dying between two inserts (not a warehouse error: nothing retries it)."""


class CrashingWarehouse(ChdbWarehouse):
    """The real embedded engine, with the process dying at the Nth uploads insert."""

    def __init__(self, path, crash_on_uploads_insert: int):
        super().__init__(path)
        self._uploads_inserts = 0
        self._crash_on = crash_on_uploads_insert

    def insert_arrow(self, table, data, dedup_token=None):
        if table == "uploads":
            self._uploads_inserts += 1
            if self._uploads_inserts == self._crash_on:
                raise SimulatedCrash("simulated crash after the samples insert")
        return super().insert_arrow(table, data, dedup_token)


SALE = DEFAULT_START_MS + 300_000


@pytest.fixture
def eu_topic(region_stack):
    settings = region_stack("eu", "sink", sink_batch_messages=25, sink_flush_ms=200)
    fleet = [v for v in build_fleet(2, owners=6, vehicles=10) if v.region == "eu"]
    sold = fleet[0]
    fleet[0] = replace(sold, history=(Period(0, sold.owner_id, "eu"), Period(SALE, "buyer", "eu")))
    register_fleet(settings, fleet)
    truth = new_truth(fleet)
    store = default_store()
    v1 = store.get("VehicleUpload", 1)
    producer = Producer(
        {"bootstrap.servers": settings.bootstrap(), "partitioner": "murmur2_random"}
    )
    count = 0
    revision = {v.vin: str(v.registration_in("eu").revision).encode() for v in fleet}
    for i, upload in enumerate(
        simulate(fleet, seed=2, start_ms=DEFAULT_START_MS, duration_s=600, truth=truth)
    ):
        producer.produce(
            settings.topics.validated,
            key=upload["vin"].encode(),
            value=store.encode(upload, v1),
            headers=[
                ("vtp-region", b"eu"),
                ("vtp-registry-revision", revision[upload["vin"]]),
                ("vtp-source", f"{settings.topics.uploads}:0:{i}".encode()),
            ],
        )
        count += 1
    assert producer.flush(30) == 0
    return settings, truth, count, sold


def run_until_drained(sink: RegionSink, settings, timeout=120):
    group, topics = sink.group, [sink.topic]
    deadline = time.monotonic() + timeout
    last_check = [0.0]

    def drained() -> bool:
        if time.monotonic() > deadline:
            return True
        if time.monotonic() - last_check[0] < 1.0:
            return False
        last_check[0] = time.monotonic()
        committed, high = group_position(settings, group, topics)
        return committed >= high

    sink.run(should_stop=drained)


def test_crash_between_samples_and_uploads_then_restart_leaves_exact_rows(eu_topic):
    settings, truth, uploads, sold = eu_topic
    crashing = CrashingWarehouse(settings.warehouse_path, crash_on_uploads_insert=3)
    with pytest.raises(SimulatedCrash):
        RegionSink(settings, warehouse=crashing).run()
    crashing.close()  # the test handed it in, so the test closes it
    committed, high = group_position(
        settings, settings.topics.sink_group, [settings.topics.validated]
    )
    # the round of the third batch was not committed (its earlier rounds, if any, were)
    assert committed < high and committed % 25 == 0

    sink = RegionSink(settings)
    run_until_drained(sink, settings)
    wh = ChdbWarehouse(settings.warehouse_path)
    try:
        ((samples, distinct),) = rows(wh.query("SELECT count(), uniqExact(vin, seq) FROM samples"))
        (stored_uploads,) = rows(wh.query("SELECT uniqExact(upload_id) FROM uploads"))[0]
        replayed = rows(
            wh.query(
                "SELECT count() FROM sink_batches GROUP BY partition, first_offset HAVING count() > 1"
            )
        )
        by_owner = rows(
            wh.query(
                "SELECT owner_id, toUnixTimestamp64Milli(min(event_time)), "
                "toUnixTimestamp64Milli(max(event_time)), count() FROM samples WHERE vin = {v:String} "
                "GROUP BY owner_id ORDER BY 2",
                {"v": sold.vin},
            )
        )
        split = rows(
            wh.query(
                "SELECT upload_id FROM uploads WHERE vin = {v:String} GROUP BY upload_id "
                "HAVING uniqExact(owner_id) = 2",
                {"v": sold.vin},
            )
        )
    finally:
        wh.close()
    assert samples == distinct == truth.totals()["samples"]
    assert stored_uploads == uploads == sink.stored_uploads + committed  # one upload a message
    assert replayed == []  # the replayed range was imposed, not recorded again
    # the sold car: each owner holds exactly the samples of their own time
    (seller, _s_first, s_last, s_n), (buyer, b_first, _b_last, b_n) = by_owner
    assert (seller, buyer) == (sold.owner_id, "buyer")
    assert s_last < SALE <= b_first and s_n + b_n == truth.vehicles[sold.vin].samples
    assert len(split) == 1  # the one upload that spans the sale is stored as two pieces


def test_the_sink_reads_its_registry_up_to_what_the_worker_decided_with(region_stack, caplog):
    import threading

    from producers.sdk import publish_registrations
    from schemas.registry import Registration

    caplog.set_level("INFO", logger="vtp.sink")
    settings = region_stack("eu", "sinkreg", sink_batch_messages=1, sink_registry_wait_s=3.0)
    vin, later_vin = "WVWZZZ1KZAW000777", "WVWZZZ1KZAW000778"
    old = [
        Registration(vin, (Period(0, "first-owner", "eu"),), revision=1),
        Registration(later_vin, (Period(0, "kept-owner", "eu"),), revision=1),
    ]
    assert publish_registrations(settings.bootstrap(), settings.topics.vehicles, old).ok
    store = default_store()
    producer = Producer({"bootstrap.servers": settings.bootstrap()})

    def routed(v: str, seq: int, revision: int) -> None:
        upload = {
            "vin": v,
            "upload_id": f"u-{v}-{seq}",
            "sent_at_ms": DEFAULT_START_MS,
            "gateway_firmware": "x",
            "samples": [{"event_time_ms": DEFAULT_START_MS, "seq": seq}],
        }
        producer.produce(
            settings.topics.validated,
            key=v.encode(),
            value=store.encode(upload, store.get("VehicleUpload", 1)),
            headers=[
                ("vtp-region", b"eu"),
                ("vtp-registry-revision", str(revision).encode()),
                ("vtp-source", f"raw:0:{v}-{seq}".encode()),
            ],
        )
        assert producer.flush(10) == 0

    # The worker decided with revision 2, which the sink has not read yet: it waits for it.
    routed(vin, 1, 2)
    # Revision 9 is not in the registry (the entry was rewritten since): once the copy holds
    # all the registry holds, the registry as it is decides, without waiting.
    routed(later_vin, 1, 9)
    routed(later_vin, 2, 9)
    sink = RegionSink(settings)
    thread = threading.Thread(target=run_until_drained, args=(sink, settings, 60))
    thread.start()
    time.sleep(1.0)
    new = [Registration(vin, (Period(0, "second-owner", "eu"),), revision=2)]
    assert publish_registrations(settings.bootstrap(), settings.topics.vehicles, new).ok
    thread.join(90)
    wh = ChdbWarehouse(settings.warehouse_path)
    try:
        owners = rows(wh.query("SELECT vin, seq, owner_id FROM samples ORDER BY vin, seq"))
    finally:
        wh.close()
    assert owners == [
        (vin, 1, "second-owner"),
        (later_vin, 1, "kept-owner"),
        (later_vin, 2, "kept-owner"),
    ]
    changed = [
        r.getMessage() for r in caplog.records if "changed after the worker" in r.getMessage()
    ]
    # one line per round that met it (the two batches may be one round)
    assert changed and all(later_vin in m for m in changed)


def test_a_registry_copy_that_cannot_catch_up_stops_the_sink_instead_of_guessing(region_stack):
    from producers.sdk import publish_registrations
    from schemas.registry import Registration
    from vtp.core.registry_copy import RegistryCopy, RegistryUnavailable

    settings = region_stack("eu", "sinklag")
    vin = "WVWZZZ1KZAW000779"
    first = [Registration(vin, (Period(0, "first-owner", "eu"),), revision=1)]
    assert publish_registrations(settings.bootstrap(), settings.topics.vehicles, first).ok
    copy = RegistryCopy(settings)
    copy.start()
    later = [
        Registration(vin, (Period(0, "first-owner", "eu"), Period(5, "buyer", "eu")), revision=2)
    ]
    assert publish_registrations(settings.bootstrap(), settings.topics.vehicles, later).ok
    copy._consumer.pause(copy._consumer.assignment())  # a copy that stopped reading
    try:
        with pytest.raises(RegistryUnavailable, match="did not catch up"):
            copy.wait_for({vin: 2}, timeout=2.0)
        copy._consumer.resume(copy._consumer.assignment())
        assert copy.wait_for({vin: 2}, timeout=30.0) == []
        assert copy[vin].revision == 2
    finally:
        copy.close()


class FlakyWarehouse(ChdbWarehouse):
    """The real embedded engine, failing its first inserts as a busy server would."""

    def __init__(self, path, failures: int):
        super().__init__(path)
        self.failures = failures

    def execute_inputs(self, sql, inputs, params, settings):
        if "INSERT INTO samples" in sql and self.failures > 0:
            self.failures -= 1
            raise WarehouseError("Code: 252. DB::Exception: Too many parts (simulated)")
        return super().execute_inputs(sql, inputs, params, settings)


def test_a_warehouse_that_fails_for_a_while_is_tried_again_and_nothing_is_lost(eu_topic):
    settings, truth, uploads, _ = eu_topic
    flaky = FlakyWarehouse(settings.warehouse_path, failures=3)
    try:
        run_until_drained(RegionSink(settings, warehouse=flaky), settings)
        ((samples, distinct),) = rows(
            flaky.query("SELECT count(), uniqExact(vin, seq) FROM samples")
        )
        (stored,) = rows(flaky.query("SELECT uniqExact(upload_id) FROM uploads"))[0]
    finally:
        flaky.close()  # it was handed in: the sink left it open for its owner
    assert flaky.failures == 0
    assert samples == distinct == truth.totals()["samples"] and stored == uploads

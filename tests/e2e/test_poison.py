"""Messages of any weight or oddity the broker accepts: each gets an outcome, the worker
stays up, and the region's good data behind them is stored."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from producers.publish import publish_fleet, register_fleet
from producers.simulator import build_fleet
from schemas import default_store
from vtp.core.warehouse import open_warehouse, rows
from vtp.harness import read_outcomes, start_sink, start_worker, topic_message_count, wait_drained

pytestmark = pytest.mark.e2e


def _upload(vin: str, samples: list[dict], upload_id: str = "poison") -> dict:
    now = int(time.time() * 1000)
    return {
        "vin": vin,
        "upload_id": upload_id,
        "sent_at_ms": now,
        "gateway_firmware": "f",
        "samples": samples,
    }


def _dead_letters(settings) -> dict[str, dict[str, bytes]]:
    """vtp-reason -> headers of the last dead letter with that reason (and its value size)."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap(), "group.id": "poison-reader"})
    topic = settings.topics.deadletter
    found: dict[str, dict[str, bytes]] = {}
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p, 0) for p in parts]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        consumer.assign([tp for tp in tps if ends[tp.partition] > 0])
        left = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + 60
        while left and time.monotonic() < deadline:
            for m in consumer.consume(100, timeout=1.0):
                if m.error():
                    continue
                headers = dict(m.headers() or [])
                headers["value bytes"] = str(len(m.value() or b"")).encode()
                found[headers["vtp-reason"].decode()] = headers
                if m.offset() + 1 >= ends[m.partition()]:
                    left.discard(m.partition())
    finally:
        consumer.close()
    return found


def test_no_message_of_any_weight_stops_the_region(region_stack):
    settings = region_stack("eu", "poison", sink_batch_messages=50, sink_flush_ms=300)
    fleet = [v for v in build_fleet(41, owners=4, vehicles=6) if v.region == "eu"]
    register_fleet(settings, fleet)
    vin = fleet[0].vin
    store = default_store()
    v1 = store.get("VehicleUpload", 1)
    sample = {"event_time_ms": int(time.time() * 1000) - 1000, "seq": 1}
    # as heavy as the broker takes (its limit is ~1 MiB): the client may send that much
    producer = Producer({"bootstrap.servers": settings.bootstrap(), "message.max.bytes": 2_000_000})
    heavy = [dict(sample, seq=i, dtcs=["P" * 120] * 8) for i in range(1012)]
    big = store.encode(_upload(vin, heavy, "big"), v1)
    assert 1_000_000 < len(big) < 1_048_000
    not_a_vin = store.encode(_upload("NOT-A-VIN-" + "X" * 20, heavy[:990], "big2"), v1)
    crowded = store.encode(_upload(vin, [dict(sample, seq=i) for i in range(10_000)], "crowd"), v1)
    poison = [
        (vin.encode(), big, "too_large"),  # a well-formed upload of 1.01 MB
        (vin.encode(), not_a_vin, "too_large"),  # ~1 MB and invalid inside
        (vin.encode(), b"\xc3\x01" + bytes(900_000), "too_large"),
        (vin.encode(), crowded, "too_many_samples"),
        (
            vin.encode(),
            store.encode(_upload(vin, [dict(sample, speed=float("nan"))], "nan"), v1),
            "invalid_sample",
        ),
        (b"K" * 900_000, store.encode(_upload(vin, [sample], "key"), v1), "key_mismatch"),
        (vin.encode(), store.encode(_upload(vin, [sample], "u" * 5000), v1), "invalid_field"),
    ]
    for key, value, _ in poison:
        producer.produce(settings.topics.uploads, key=key, value=value)
    # and a registry entry that is not one: the worker and the sink's copy both go on
    producer.produce(settings.topics.vehicles, key=b"WVWZZZ1KZAW000999", value=b"\x00garbage")
    assert producer.flush(30) == 0
    worker, sink = start_worker(settings), start_sink(settings)
    try:
        good = publish_fleet(settings, fleet, seed=41, duration_s=600)  # behind the poison
        assert good.report.ok
        assert wait_drained(settings, [worker, sink], timeout=240)
        assert worker.popen.poll() is None and worker.restarts == 0  # never exited
    finally:
        worker.stop()
        sink.stop()
    assert worker.log_path.read_text().count("[^Worker]: Ready") == 1
    outcomes = read_outcomes(settings)
    for _, _, reason in poison:
        assert outcomes.deadlettered[reason] >= 1, (reason, outcomes)
    assert outcomes.deadlettered["too_large"] == 3
    letters = _dead_letters(settings)
    assert int(letters["too_large"]["vtp-truncated"]) > 500_000  # the start kept, and its size
    assert int(letters["too_large"]["value bytes"]) == 64 * 1024
    assert int(letters["key_mismatch"]["value bytes"]) < 1000
    wh = open_warehouse(settings)
    try:
        ((stored,),) = rows(wh.query("SELECT uniqExact(upload_id) FROM uploads"))
        ((samples,),) = rows(wh.query("SELECT count() FROM samples"))
    finally:
        wh.close()
    assert stored == good.uploads and samples == good.samples
    assert letters["not_single_object"]["vtp-stage"] == b"registry"
    produced = topic_message_count(settings, settings.topics.uploads)
    from_uploads = outcomes.deadlettered_total - 1  # the registry's own dead letter
    assert produced == stored + from_uploads + outcomes.quarantined_total

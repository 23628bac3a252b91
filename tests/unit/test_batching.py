from sinks.batching import Batcher


def no_record(topic, partition, first):
    return None


def test_cut_by_count_per_partition():
    b = Batcher(3, 60.0, no_record)
    for off in range(7):
        b.add("t", 0, off, f"m{off}", now=0.0)
    b.add("t", 1, 0, "x", now=0.0)
    ready = b.take_ready(now=1.0)
    assert [(x.partition, x.first_offset, x.last_offset) for x in ready] == [(0, 0, 2), (0, 3, 5)]
    assert ready[0].token == "t-0-0-2"
    assert b.pending() == 2


def test_partial_batches_wait_for_the_flush_interval():
    b = Batcher(100, 0.5, no_record)
    b.add("t", 0, 5, "a", now=10.0)
    assert b.take_ready(now=10.2) == []
    (batch,) = b.take_ready(now=10.6)
    assert (batch.first_offset, batch.last_offset, batch.items) == (5, 5, ["a"])


def test_a_recorded_range_is_imposed_again_and_never_cut_early():
    recorded = {("t", 0, 10): 14}
    b = Batcher(2, 0.1, lambda t, p, f: recorded.get((t, p, f)))
    for off in range(10, 14):
        b.add("t", 0, off, off, now=0.0)
    # count limit is 2 and the flush interval long past, yet the replay waits for 14
    assert b.take_ready(now=99.0) == []
    assert b.take_ready(now=99.0, final=True) == []
    b.add("t", 0, 14, 14, now=0.0)
    b.add("t", 0, 15, 15, now=0.0)
    ready = b.take_ready(now=99.0)
    assert [(x.first_offset, x.last_offset, x.forced_last) for x in ready] == [
        (10, 14, 14),
        (15, 15, None),
    ]


def test_a_gap_past_the_recorded_end_closes_the_replayed_batch():
    b = Batcher(100, 60.0, lambda t, p, f: 12 if f == 10 else None)
    b.add("t", 0, 10, "a", now=0.0)
    b.add("t", 0, 13, "b", now=0.0)  # offset 11..12 no longer exist
    (batch,) = b.take_ready(now=0.0)
    assert (batch.first_offset, batch.last_offset) == (10, 10)


def test_final_cut_and_revoked_partitions():
    b = Batcher(100, 60.0, no_record)
    b.add("t", 0, 1, "a", now=0.0)
    b.add("t", 1, 1, "b", now=0.0)
    b.drop("t", [1])
    (batch,) = b.take_ready(now=0.0, final=True)
    assert batch.partition == 0 and b.pending() == 0


def test_a_message_of_many_uploads_weighs_as_many_and_is_never_split():
    b = Batcher(100, 60.0, no_record)
    b.add("t", 0, 0, "batch of 60", now=0.0, weight=60)
    assert b.take_ready(now=0.0) == []
    b.add("t", 0, 1, "batch of 70", now=0.0, weight=70)  # 130 >= 100: cut after it
    (batch,) = b.take_ready(now=0.0)
    assert (batch.first_offset, batch.last_offset, batch.weight) == (0, 1, 130)


def test_a_topic_can_wait_longer_than_the_others():
    b = Batcher(100, 0.5, no_record, {"aggregates": 2.0})
    b.add("uploads", 0, 0, "u", now=0.0)
    b.add("aggregates", 0, 0, "a", now=0.0)
    assert [x.topic for x in b.take_ready(now=0.6)] == ["uploads"]
    assert b.take_ready(now=1.9) == []
    assert [x.topic for x in b.take_ready(now=2.1)] == ["aggregates"]

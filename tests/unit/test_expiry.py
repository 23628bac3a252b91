"""Which worker entries are quiet, and how a sweep hands them out."""

from aiokafka.partitioner import DefaultPartitioner

from stream_jobs.expiry import QuietSweep, is_quiet, key_partition, sweep_interval_s


def test_quiet_means_older_than_the_ttl_and_never_with_a_ttl_of_zero():
    assert is_quiet(1_000, 1_000 + 5_001, 5_000)
    assert not is_quiet(1_000, 1_000 + 5_000, 5_000)
    assert not is_quiet(1_000, 10**12, 0)
    assert not is_quiet(None, 10**12, 5_000)  # an entry that does not say when


def test_a_key_lives_on_the_partition_kafkas_default_partitioner_gives_it():
    partitions = list(range(6))
    for i in range(200):
        key = f"WVWZZZ1JZ{i:08d}".encode()
        assert key_partition(key, 6) == DefaultPartitioner()(key, partitions, partitions)


def test_a_sweep_hands_out_slices_and_starts_a_new_pass_only_when_due():
    sweep = QuietSweep(every_s=10.0, slice_keys=3)
    keys = [bytes([i]) for i in range(7)]
    seen = []
    seen += sweep.due(lambda: keys, now_s=0.0)
    seen += sweep.due(lambda: keys, now_s=1.0)
    seen += sweep.due(lambda: keys, now_s=2.0)
    assert sorted(seen) == keys
    assert sweep.due(lambda: keys, now_s=5.0) == []  # the pass is done; the next not due
    assert len(sweep.due(lambda: keys, now_s=10.0)) == 3


def test_a_pass_starts_at_least_every_ten_minutes_and_at_most_every_second():
    assert sweep_interval_s(30 * 86400) == 600
    assert sweep_interval_s(12) == 1.2
    assert sweep_interval_s(2) == 1.0

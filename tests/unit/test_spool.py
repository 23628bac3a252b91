"""The vehicle's spool keeps every upload whose append returned until it is done, in order,
across restarts, crashes and torn writes; it drops only what its limits say, and counts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producers.spool import HEADER_BYTES, Entry, Spool, SpoolFull, SpoolLocked

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def opened() -> Iterator[Callable[..., Spool]]:
    """Opens spools and closes whatever a test left open."""
    spools: list[Spool] = []

    def open_spool(folder: Path, **kwargs: object) -> Spool:
        spool = Spool(folder, **kwargs)  # type: ignore[arg-type]
        spools.append(spool)
        return spool

    yield open_spool
    for spool in spools:
        spool.close()


def size_of(upload_id: str, payload: bytes) -> int:
    return HEADER_BYTES + len(upload_id.encode()) + len(payload)


def seqs(entries: list[Entry]) -> list[int]:
    return [e.seq for e in entries]


def done_mark(folder: Path) -> int | None:
    """The first seq not done, as persisted; None before the prefix first moves."""
    path = folder / "done"
    return int(path.read_text()) if path.exists() else None


def segments(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.seg"))


def test_round_trip(tmp_path, opened):
    clock = Clock()
    spool = opened(tmp_path, clock=clock)
    assert spool.append("u-0", b"first") == 0
    assert spool.append("u-1", b"") == 1
    assert spool.pending() == [
        Entry(0, "u-0", b"first", clock.now),
        Entry(1, "u-1", b"", clock.now),
    ]
    spool.ack(0)
    assert seqs(spool.pending()) == [1]
    stats = spool.stats
    assert (stats.appended, stats.acked, stats.records_pending) == (2, 1, 1)


def test_order_across_segments_and_paging(tmp_path, opened):
    spool = opened(tmp_path, segment_bytes=200)
    for i in range(20):
        assert spool.append(f"u-{i}", bytes([i]) * 100) == i
    assert len(segments(tmp_path)) == 20  # one record fills a segment of 200 bytes
    assert seqs(spool.pending(limit=100)) == list(range(20))
    assert seqs(spool.pending(limit=5)) == [0, 1, 2, 3, 4]
    assert seqs(spool.pending(after_seq=4, limit=3)) == [5, 6, 7]
    assert [e.payload for e in spool.pending(after_seq=18)] == [bytes([19]) * 100]


def test_restart_keeps_pending_and_numbering_and_never_returns_acked(tmp_path, opened):
    spool = opened(tmp_path, segment_bytes=300)
    for i in range(10):
        spool.append(f"u-{i}", b"x" * 50)
    for seq in range(4):
        spool.ack(seq)
    bytes_before = spool.stats.bytes_pending
    spool.close()
    again = opened(tmp_path, segment_bytes=300)
    assert seqs(again.pending(limit=100)) == list(range(4, 10))
    assert again.stats.bytes_pending == bytes_before == 6 * size_of("u-4", b"x" * 50)
    assert again.append("u-10", b"y") == 10
    again.ack(4)
    again.close()
    third = opened(tmp_path)
    assert seqs(third.pending(limit=100)) == [5, 6, 7, 8, 9, 10]


def test_seq_numbering_survives_when_every_record_was_done(tmp_path, opened):
    spool = opened(tmp_path, segment_bytes=100)
    for i in range(5):
        spool.ack(spool.append(f"u-{i}", b"z" * 80))
    spool.close()
    again = opened(tmp_path, segment_bytes=100)
    assert again.pending() == []
    assert again.append("u-5", b"z") == 5


def test_out_of_order_acks_persist_only_the_contiguous_prefix(tmp_path, opened):
    spool = opened(tmp_path)
    for i in range(6):
        spool.append(f"u-{i}", b"p")
    spool.ack(2)
    spool.ack(4)
    assert seqs(spool.pending()) == [0, 1, 3, 5]  # acked above the gap: done in memory
    assert done_mark(tmp_path) is None
    spool.ack(0)
    spool.ack(1)  # the prefix now runs through 2
    assert done_mark(tmp_path) == 3
    spool.ack(1)  # again: nothing happens
    assert spool.stats.acked == 4
    with pytest.raises(ValueError, match="never appended"):
        spool.ack(6)
    spool.close()
    # After a restart a record acked above a gap (4) comes back; the prefix never does.
    again = opened(tmp_path)
    assert seqs(again.pending()) == [3, 4, 5]
    again.ack_many([5, 3, 4])  # one gateway frame, out of order: done is written once
    assert done_mark(tmp_path) == 6 and again.pending() == [] and again.stats.acked == 3


def test_full_drops_the_oldest_and_counts_them(tmp_path, opened):
    record = size_of("u-0", b"a" * 100)
    spool = opened(tmp_path, max_bytes=3 * record)
    for i in range(3):
        spool.append(f"u-{i}", b"a" * 100)
    spool.ack(1)  # acked above a gap: it holds no room
    assert spool.append("u-3", b"a" * 100) == 3
    assert spool.append("u-4", b"a" * 100) == 4  # no room left: seq 0 goes
    assert seqs(spool.pending()) == [2, 3, 4]
    stats = spool.stats
    assert stats.dropped_full == 1 and stats.bytes_pending == 3 * record
    assert any("dropped seq 0" in r for r in stats.recent)
    with pytest.raises(ValueError, match="can never fit"):
        spool.append("u-big", b"b" * 3 * record)
    spool.ack(0)  # dropped already: an ack that comes late changes nothing
    assert spool.stats.acked == 1


def test_full_refuses_the_newest_when_told(tmp_path, opened):
    record = size_of("u-0", b"a" * 100)
    spool = opened(tmp_path, max_bytes=2 * record, drop="newest")
    spool.append("u-0", b"a" * 100)
    spool.append("u-1", b"a" * 100)
    with pytest.raises(SpoolFull):
        spool.append("u-2", b"a" * 100)
    assert seqs(spool.pending()) == [0, 1]
    assert spool.stats.dropped_full == 1
    spool.ack(0)
    assert spool.append("u-3", b"a" * 100) == 2  # a refused append takes no seq


def test_expiry_by_the_injected_clock(tmp_path, opened):
    clock = Clock()
    spool = opened(tmp_path, max_age_s=60, clock=clock)
    spool.append("old-0", b"o")
    spool.append("old-1", b"o")
    clock.now += 30
    spool.append("new", b"n")
    clock.now += 31
    assert [e.upload_id for e in spool.pending()] == ["new"]
    stats = spool.stats
    assert stats.dropped_expired == 2 and stats.records_pending == 1
    assert stats.oldest_pending_age_s == pytest.approx(31)
    assert done_mark(tmp_path) == 2


def test_refusals_are_done_and_their_reasons_kept(tmp_path, opened):
    spool = opened(tmp_path)
    for i in range(3):
        spool.append(f"u-{i}", b"r")
    spool.refuse(1, "vin_mismatch")
    assert seqs(spool.pending()) == [0, 2]
    stats = spool.stats
    assert stats.refused == 1
    assert stats.recent[-1] == "refused seq 1 (u-1): vin_mismatch"


def test_a_torn_tail_is_cut_and_reported_earlier_records_intact(tmp_path, opened):
    spool = opened(tmp_path)
    for i in range(5):
        spool.append(f"u-{i}", bytes([i]) * 300)
    spool.close()
    (segment,) = tmp_path.glob("*.seg")
    whole = segment.stat().st_size
    with open(segment, "r+b") as f:  # the last record half written, then junk
        f.truncate(whole - 150)
        f.seek(0, os.SEEK_END)
        f.write(b"\x00\xffgarbage" * 7)
    again = opened(tmp_path)
    entries = again.pending()
    assert [(e.seq, e.payload) for e in entries] == [(i, bytes([i]) * 300) for i in range(4)]
    stats = again.stats
    assert stats.torn_bytes == size_of("u-4", b"x" * 300) - 150 + 9 * 7
    assert any("interrupted append" in r for r in stats.recent)
    assert again.append("u-next", b"n") == 4  # the torn record never returned its seq
    again.close()
    assert seqs(opened(tmp_path).pending()) == [0, 1, 2, 3, 4]


def test_a_corrupt_record_inside_a_segment_is_skipped_not_the_rest(tmp_path, opened):
    spool = opened(tmp_path)
    for i in range(5):
        spool.append(f"u-{i}", bytes([i]) * 100)
    spool.close()
    (segment,) = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    data[size_of("u-0", b"x" * 100) + HEADER_BYTES + 10] ^= 0xFF  # inside seq 1's payload
    segment.write_bytes(bytes(data))
    again = opened(tmp_path)
    assert seqs(again.pending()) == [0, 2, 3, 4]
    stats = again.stats
    assert stats.dropped_corrupt == 1 and stats.skipped_bytes == size_of("u-1", b"x" * 100)
    assert stats.torn_bytes == 0


def test_a_record_corrupted_after_open_is_dropped_when_read(tmp_path, opened):
    spool = opened(tmp_path)
    spool.append("u-0", b"a" * 100)
    spool.append("u-1", b"b" * 100)
    (segment,) = tmp_path.glob("*.seg")
    with open(segment, "r+b") as f:
        f.seek(HEADER_BYTES + 5)
        f.write(b"!")
    assert seqs(spool.pending()) == [1]
    assert spool.stats.dropped_corrupt == 1


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from producers.spool import Spool

    spool = Spool(Path(sys.argv[1]), segment_bytes=16 * 1024)
    i = 0
    while True:
        seq = spool.append(f"u-{i}", bytes([i % 251]) * (500 + i % 700))
        print(seq, flush=True)
        i += 1
    """
)


def test_a_process_killed_while_appending_loses_nothing_it_returned(tmp_path, opened):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert child.stdout is not None
    returned = []
    try:
        while len(returned) < 300:
            line = child.stdout.readline()
            assert line, "the child stopped before appending"
            returned.append(int(line))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    rest = child.stdout.read().decode()
    child.stdout.close()
    returned += [int(line) for line in rest.split("\n") if line.strip()]
    assert returned == list(range(len(returned)))

    spool = opened(tmp_path)
    entries = spool.pending(limit=100_000)
    assert seqs(entries)[: len(returned)] == returned
    assert seqs(entries) == list(range(len(entries)))  # in order, and nothing beyond lost
    for e in entries:
        assert e.upload_id == f"u-{e.seq}"
        assert e.payload == bytes([e.seq % 251]) * (500 + e.seq % 700)
    assert spool.stats.dropped_corrupt == spool.stats.skipped_bytes == 0


def test_a_second_open_of_the_folder_is_refused(tmp_path, opened):
    spool = opened(tmp_path)
    with pytest.raises(SpoolLocked, match=f"pid {os.getpid()}"):
        Spool(tmp_path)
    other = subprocess.run(
        [sys.executable, "-c", f"from producers.spool import Spool; Spool({str(tmp_path)!r})"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert other.returncode != 0 and "SpoolLocked" in other.stderr
    spool.close()
    opened(tmp_path)  # released by close


def test_segments_are_deleted_once_all_their_records_are_done(tmp_path, opened):
    spool = opened(tmp_path, segment_bytes=250)
    for i in range(6):  # 133-byte records: one per segment
        spool.append(f"u-{i}", b"s" * 100)
    assert len(segments(tmp_path)) == 6
    spool.ack(1)
    assert len(segments(tmp_path)) == 6  # seq 0 still pins the prefix
    spool.ack(0)
    assert segments(tmp_path) == [f"{s:020d}.seg" for s in range(2, 6)]
    for seq in range(2, 6):
        spool.ack(seq)
    assert segments(tmp_path) == [f"{5:020d}.seg"]  # the segment being appended to stays
    spool.close()
    opened(tmp_path, segment_bytes=250)
    assert segments(tmp_path) == []  # at open a done segment goes too


def test_bytes_accounting(tmp_path, opened):
    clock = Clock()
    spool = opened(tmp_path, segment_bytes=1000, clock=clock)
    sizes = {}
    for i in range(12):
        payload = b"q" * (i * 37)
        sizes[spool.append(f"upload-{i}", payload)] = size_of(f"upload-{i}", payload)
    assert spool.stats.bytes_pending == sum(sizes.values())
    assert spool.stats.disk_bytes == sum(sizes.values())
    for seq in (0, 3, 7):
        spool.ack(seq)
    spool.refuse(5, "malformed_avro")
    left = sum(v for k, v in sizes.items() if k not in (0, 3, 5, 7))
    stats = spool.stats
    assert (stats.bytes_pending, stats.records_pending) == (left, 8)
    spool.close()
    again = opened(tmp_path, segment_bytes=1000, clock=clock)
    # after a restart the records acked above the gap (3, 5, 7) are pending again
    assert again.stats.bytes_pending == left + sizes[3] + sizes[5] + sizes[7]
    assert again.stats.records_pending == 11


def test_one_thread_appends_while_another_reads_and_acks(tmp_path, opened):
    spool = opened(tmp_path, segment_bytes=4096, fsync=False)
    count = 2000
    sent: list[int] = []

    def sender() -> None:
        after = None
        while len(sent) < count:
            for entry in spool.pending(after_seq=after, limit=16):
                sent.append(entry.seq)
                after = entry.seq
                spool.ack(entry.seq)

    thread = threading.Thread(target=sender)
    thread.start()
    for i in range(count):
        spool.append(f"u-{i}", b"t" * (i % 300))
    thread.join(timeout=30)
    assert not thread.is_alive() and sent == list(range(count))
    stats = spool.stats
    assert (stats.acked, stats.records_pending, stats.bytes_pending) == (count, 0, 0)
    assert len(segments(tmp_path)) == 1


def test_closed_spool_refuses_calls(tmp_path, opened):
    spool = opened(tmp_path)
    spool.close()
    spool.close()
    with pytest.raises(ValueError, match="closed"):
        spool.append("u", b"")

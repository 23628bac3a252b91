"""The vehicle's durable store-and-forward spool: an upload waits on disk until the gateway
has answered it, across restarts, crashes and weeks without a network.

    spool = Spool(Path("/var/lib/vtp/spool") / vin)
    seq = spool.append(upload_id, upload_bytes)   # on disk when it returns
    for entry in spool.pending(limit=64):         # the sender thread, oldest first
        send(entry.payload)
    spool.ack(seq)                                # the gateway has it: never handed out again

One folder per vehicle, opened by one process at a time (``lock``, an flock). It holds:

- segment files ``<first seq:020d>.seg``, append-only; each record is
  ``magic "VSP1" | length u32 | crc32 u32 | seq u64 | appended_at_ms i64 | id length u16 |
  upload_id (UTF-8) | payload``, little-endian, where length and crc32 cover everything
  after the crc field;
- ``done``: the first seq that is not done (every record below it was acked, refused,
  dropped or expired), replaced atomically (write a temporary file, fsync, rename, fsync
  the folder).

What survives a restart, and what the choices were:

- Acks may arrive out of order. ``done`` only ever holds the contiguous prefix, so it never
  marks an unacknowledged record done; a record acked above a gap is done in memory only,
  and after a restart it is pending again and sent a second time (the gateway's consumers
  deduplicate on upload_id). A record below ``done`` is never handed out again.
- An append interrupted by a crash leaves a short or torn record at the end of a segment:
  opening cuts it away and reports the bytes in ``stats.torn_bytes``. The append never
  returned, so nothing promised is lost, and its seq is given to the next append.
- A corrupt record inside a segment (a bad sector, not a crash) is skipped by resyncing on
  the next position where a whole record parses: magic, a length that fits, a matching
  crc32 and a seq above the last good one. Skipping to the next segment would throw away
  up to ``segment_bytes`` of good uploads for one bad record, and the checks make a false
  resync practically impossible. Missing seqs that were not done are counted in
  ``stats.dropped_corrupt``; nothing about corruption ever raises.
- ``max_bytes`` bounds the bytes of records not yet done (headers included). Done records
  stay on disk until every record of their segment is done, so the folder can hold more
  than that by records acked above a gap and the done part of the oldest segments.
- Counters (appended, acked, ...) count since this open; pending records and bytes are
  rebuilt from the segments.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

MAGIC = b"VSP1"
_HEAD = struct.Struct("<4sII")  # magic, length of the rest, crc32 of the rest
_META = struct.Struct("<QqH")  # seq, appended_at_ms, upload_id length
HEADER_BYTES = _HEAD.size + _META.size
MAX_UPLOAD_ID_BYTES = 0xFFFF
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
DONE_FILE = "done"
LOCK_FILE = "lock"
RECENT_REASONS = 10


class SpoolFull(Exception):
    """The spool is full and drops the newest: this record was not stored."""


class SpoolLocked(RuntimeError):
    """Another process (or another Spool in this one) has the folder open."""


@dataclass(frozen=True)
class Entry:
    seq: int
    upload_id: str
    payload: bytes
    appended_at: float  # the spool's clock, in seconds, when it was appended


@dataclass(frozen=True)
class SpoolStats:
    records_pending: int
    bytes_pending: int  # on-disk bytes of the records not done, headers included
    oldest_pending_age_s: float | None
    appended: int
    acked: int
    refused: int
    dropped_full: int  # oldest records dropped for room, or new ones refused (drop="newest")
    dropped_expired: int
    dropped_corrupt: int  # not-done records missing or unreadable in the segments
    torn_bytes: int  # cut from the end of segments at open: interrupted appends
    skipped_bytes: int  # corrupt bytes skipped inside segments at open
    disk_bytes: int  # the segment files' size
    recent: tuple[str, ...]  # the last few drop, refuse and recovery reasons, oldest first


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    size: int = 0
    last_seq: int | None = None
    read_fd: int | None = None


@dataclass(frozen=True, slots=True)
class _Record:
    segment: _Segment
    offset: int
    length: int  # the whole record, header included
    upload_id: str
    appended_at_ms: int


@dataclass(frozen=True, slots=True)
class _Parsed:
    seq: int
    appended_at_ms: int
    upload_id: str
    payload: memoryview
    length: int


def _encode(seq: int, appended_at_ms: int, upload_id: bytes, payload: bytes) -> bytes:
    body = _META.pack(seq, appended_at_ms, len(upload_id)) + upload_id + payload
    return _HEAD.pack(MAGIC, len(body), zlib.crc32(body)) + body


def _parse(data: bytes, pos: int, min_seq: int = 0, below: int | None = None) -> _Parsed | None:
    """The record at ``pos`` if it is whole, intact and its seq in [min_seq, below)."""
    if len(data) - pos < HEADER_BYTES:
        return None
    magic, length, crc = _HEAD.unpack_from(data, pos)
    start = pos + _HEAD.size
    if magic != MAGIC or length < _META.size or start + length > len(data):
        return None
    body = memoryview(data)[start : start + length]
    if zlib.crc32(body) != crc:
        return None
    seq, at_ms, id_len = _META.unpack_from(body)
    if id_len > length - _META.size or seq < min_seq or (below is not None and seq >= below):
        return None
    try:
        upload_id = bytes(body[_META.size : _META.size + id_len]).decode()
    except UnicodeDecodeError:
        return None
    return _Parsed(seq, at_ms, upload_id, body[_META.size + id_len :], _HEAD.size + length)


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}..{last}"


class Spool:
    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int = 64 * 2**20,
        max_age_s: float = 6 * 86400,
        drop: Literal["oldest", "newest"] = "oldest",
        segment_bytes: int = 4 * 2**20,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
    ):
        if max_bytes <= HEADER_BYTES or segment_bytes <= 0 or max_age_s <= 0:
            raise ValueError("max_bytes, segment_bytes and max_age_s must be positive")
        if drop not in ("oldest", "newest"):
            raise ValueError(f"drop must be 'oldest' or 'newest', not {drop!r}")
        self.folder = Path(folder)
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._drop = drop
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._clock = clock
        self._mutex = threading.Lock()
        self._closed = False
        self._records: OrderedDict[int, _Record] = OrderedDict()  # not done, in seq order
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._write_fd: int | None = None
        self._bytes_pending = 0
        self._done = 0  # the first seq not done, as persisted in DONE_FILE
        self._next_seq = 0
        self._last_seen = -1  # while opening: the highest seq found so far
        self._counts = dict.fromkeys(
            ("appended", "acked", "refused", "dropped_full", "dropped_expired"), 0
        )
        self._counts.update(dropped_corrupt=0, torn_bytes=0, skipped_bytes=0)
        self._recent: deque[str] = deque(maxlen=RECENT_REASONS)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    # -- the API ------------------------------------------------------------------
    def append(self, upload_id: str, payload: bytes) -> int:
        """Store one upload; it is on disk (fsynced unless fsync=False) when this returns.
        Returns its seq. When full, drop="oldest" drops the oldest records not done (even
        ones in flight: their late ack changes nothing); drop="newest" raises SpoolFull.
        ValueError: the record (header, upload_id and payload) is larger than max_bytes."""
        uid = upload_id.encode()
        if len(uid) > MAX_UPLOAD_ID_BYTES:
            raise ValueError(f"upload_id is {len(uid)} bytes; at most {MAX_UPLOAD_ID_BYTES}")
        size = HEADER_BYTES + len(uid) + len(payload)
        if size > self._max_bytes:
            raise ValueError(
                f"a record of {size} bytes (payload {len(payload)}) can never fit a spool "
                f"of max_bytes={self._max_bytes}"
            )
        with self._mutex:
            self._check_open()
            now = self._clock()
            self._expire_oldest(now)
            if self._bytes_pending + size > self._max_bytes:
                self._make_room(size, upload_id)
            self._settle()
            seq = self._next_seq
            segment, fd = self._segment_for(size)
            offset = segment.size
            self._write(fd, offset, _encode(seq, int(now * 1000), uid, payload))
            segment.size += size
            segment.last_seq = seq
            self._records[seq] = _Record(segment, offset, size, upload_id, int(now * 1000))
            self._bytes_pending += size
            self._next_seq = seq + 1
            self._counts["appended"] += 1
            return seq

    def pending(self, after_seq: int | None = None, limit: int = 64) -> list[Entry]:
        """Up to ``limit`` records not done, with seq > after_seq, oldest first. Records
        older than max_age_s are dropped as expired instead of returned."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        with self._mutex:
            self._check_open()
            now = self._clock()
            self._expire_oldest(now)
            out: list[Entry] = []
            if not self._records:
                return out
            # Walk seqs, not the dict: gaps are the few records acked above an older one.
            seq = max(-1 if after_seq is None else after_seq, next(iter(self._records)) - 1)
            last = next(reversed(self._records))
            expired: list[int] = []
            while len(out) < limit and seq < last:
                seq += 1
                record = self._records.get(seq)
                if record is not None:
                    if self._expired(record, now):
                        self._finish(seq)
                        expired.append(seq)
                    elif (entry := self._read(seq, record)) is not None:
                        out.append(entry)
            if expired:
                self._counts["dropped_expired"] += len(expired)
                self._recent.append(f"expired: {_seqs(expired[0], expired[-1])} (out of order)")
            self._settle()
            return out

    def ack(self, seq: int) -> None:
        """The gateway has this record; durable (as far as ``done`` can say) on return."""
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> None:
        """ack() for a batch (one gateway ack frame): ``done`` is written once, not per seq."""
        with self._mutex:
            self._check_open()
            for seq in seqs:
                if self._finish(seq) is not None:
                    self._counts["acked"] += 1
            self._settle()

    def refuse(self, seq: int, reason: str) -> None:
        """The gateway will never store this record: done, counted, its reason kept."""
        with self._mutex:
            self._check_open()
            record = self._finish(seq)
            if record is not None:
                self._counts["refused"] += 1
                self._recent.append(f"refused seq {seq} ({record.upload_id}): {reason}")
                self._settle()

    @property
    def stats(self) -> SpoolStats:
        with self._mutex:
            oldest = next(iter(self._records.values()), None)
            return SpoolStats(
                records_pending=len(self._records),
                bytes_pending=self._bytes_pending,
                oldest_pending_age_s=(
                    None if oldest is None else self._clock() - oldest.appended_at_ms / 1000
                ),
                disk_bytes=sum(s.size for s in self._segments),
                recent=tuple(self._recent),
                **self._counts,
            )

    def close(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._release()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- opening --------------------------------------------------------------------
    def _take_lock(self) -> int:
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SpoolLocked(
                f"spool {self.folder} is already open (pid {holder}); a vehicle's spool is "
                "opened by one process at a time"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _open(self) -> None:
        self._done = self._read_done()
        names = sorted(
            (int(m.group(1)), self.folder / m.group(0))
            for m in map(_SEGMENT_NAME.match, os.listdir(self.folder))
            if m
        )
        for i, (first, path) in enumerate(names):
            below = names[i + 1][0] if i + 1 < len(names) else None
            segment = _Segment(first, path)
            self._segments.append(segment)
            self._scan(segment, below)
        self._next_seq = max(
            [self._done, self._last_seen + 1] + [segment.first_seq for segment in self._segments]
        )
        self._delete_done_segments()
        self._active = self._segments[-1] if self._segments else None

    def _read_done(self) -> int:
        try:
            text = (self.folder / DONE_FILE).read_text()
        except FileNotFoundError:
            return 0
        try:
            return max(0, int(text.strip()))
        except ValueError:
            self._recent.append(f"open: {DONE_FILE} unreadable ({text[:20]!r}); all is pending")
            return 0

    def _scan(self, segment: _Segment, below: int | None) -> None:
        data = segment.path.read_bytes()
        pos = 0
        while pos < len(data):
            parsed = _parse(data, pos, max(self._last_seen + 1, segment.first_seq), below)
            if parsed is None:
                found = self._resync(data, pos + 1, segment, below)
                if found is None:
                    self._cut(segment, pos, len(data) - pos)
                    return
                self._counts["skipped_bytes"] += found - pos
                self._recent.append(
                    f"open: skipped {found - pos} corrupt bytes at {pos} in {segment.path.name}"
                )
                pos = found
                continue
            lost_from = max(self._last_seen + 1, self._done)
            if parsed.seq > lost_from:
                self._counts["dropped_corrupt"] += parsed.seq - lost_from
                self._recent.append(f"open: {_seqs(lost_from, parsed.seq - 1)} missing")
            self._last_seen = segment.last_seq = parsed.seq
            if parsed.seq >= self._done:
                self._records[parsed.seq] = _Record(
                    segment, pos, parsed.length, parsed.upload_id, parsed.appended_at_ms
                )
                self._bytes_pending += parsed.length
            pos += parsed.length
        segment.size = pos

    def _resync(self, data: bytes, start: int, segment: _Segment, below: int | None) -> int | None:
        min_seq = max(self._last_seen + 1, segment.first_seq)
        while (found := data.find(MAGIC, start)) >= 0:
            if _parse(data, found, min_seq, below) is not None:
                return found
            start = found + 1
        return None

    def _cut(self, segment: _Segment, at: int, count: int) -> None:
        with open(segment.path, "r+b") as f:
            f.truncate(at)
            if self._fsync:
                os.fsync(f.fileno())
        segment.size = at
        self._counts["torn_bytes"] += count
        self._recent.append(
            f"open: cut {count} bytes of an interrupted append from {segment.path.name}"
        )

    # -- writing --------------------------------------------------------------------
    def _segment_for(self, size: int) -> tuple[_Segment, int]:
        active = self._active
        if active is None or (active.size > 0 and active.size + size > self._segment_bytes):
            self._close_write_fd()
            active = _Segment(self._next_seq, self.folder / f"{self._next_seq:020d}.seg")
            self._segments.append(active)
            self._active = active
        if self._write_fd is None:
            self._write_fd = os.open(
                active.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
            )
            self._sync_folder()  # the new file's name is durable with its first record
        return active, self._write_fd

    def _write(self, fd: int, offset: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync:
                os.fdatasync(fd)
        except OSError:
            # Leave no partial record for the next append to follow (disk full, say).
            os.ftruncate(fd, offset)
            raise

    def _make_room(self, size: int, upload_id: str) -> None:
        if self._drop == "newest":
            self._counts["dropped_full"] += 1
            self._recent.append(f"full: refused new upload {upload_id}")
            raise SpoolFull(
                f"spool {self.folder} is full ({self._bytes_pending} of {self._max_bytes} bytes "
                "pending); drop='newest' keeps the older uploads"
            )
        dropped = []
        while self._records and self._bytes_pending + size > self._max_bytes:
            seq = next(iter(self._records))
            self._finish(seq)
            dropped.append(seq)
        if dropped:
            self._counts["dropped_full"] += len(dropped)
            self._recent.append(f"full: dropped {_seqs(dropped[0], dropped[-1])} for room")

    def _expire_oldest(self, now: float) -> None:
        expired = []
        while self._records:
            seq, record = next(iter(self._records.items()))
            if not self._expired(record, now):
                break
            self._finish(seq)
            expired.append(seq)
        if expired:
            self._counts["dropped_expired"] += len(expired)
            self._recent.append(
                f"expired: {_seqs(expired[0], expired[-1])} older than {self._max_age_s:g} s"
            )

    def _expired(self, record: _Record, now: float) -> bool:
        return now - record.appended_at_ms / 1000 > self._max_age_s

    def _finish(self, seq: int) -> _Record | None:
        """Take ``seq`` off the pending records; None if it was done already."""
        if not 0 <= seq < self._next_seq:
            raise ValueError(f"seq {seq} was never appended (the next is {self._next_seq})")
        record = self._records.pop(seq, None)
        if record is not None:
            self._bytes_pending -= record.length
        return record

    def _settle(self) -> None:
        """Persist the contiguous done prefix if it moved, then delete done segments."""
        first = next(iter(self._records), self._next_seq)
        if first > self._done:
            self._done = first
            tmp = self.folder / (DONE_FILE + ".tmp")
            with open(tmp, "wb") as f:
                f.write(f"{first}\n".encode())
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.folder / DONE_FILE)
            self._sync_folder()
            self._delete_done_segments()

    def _delete_done_segments(self) -> None:
        # The segment being appended to stays until it is full: deleting and recreating it
        # when a connected vehicle's every record is acked would cost a file per upload.
        for segment in list(self._segments):
            if segment is not self._active and (
                segment.last_seq is None or segment.last_seq < self._done
            ):
                if segment.read_fd is not None:
                    os.close(segment.read_fd)
                segment.path.unlink(missing_ok=True)
                self._segments.remove(segment)

    # -- reading --------------------------------------------------------------------
    def _read(self, seq: int, record: _Record) -> Entry | None:
        segment = record.segment
        if segment.read_fd is None:
            segment.read_fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(segment.read_fd, record.length, record.offset)
        parsed = _parse(data, 0, seq, seq + 1)
        if parsed is None or parsed.length != record.length:
            self._finish(seq)
            self._counts["dropped_corrupt"] += 1
            self._recent.append(f"corrupt on read: seq {seq} ({record.upload_id}) dropped")
            return None
        return Entry(seq, parsed.upload_id, bytes(parsed.payload), parsed.appended_at_ms / 1000)

    # -- housekeeping -----------------------------------------------------------------
    def _sync_folder(self) -> None:
        if self._fsync:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"spool {self.folder} is closed")

    def _close_write_fd(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def _release(self) -> None:
        self._close_write_fd()
        for segment in self._segments:
            if segment.read_fd is not None:
                os.close(segment.read_fd)
                segment.read_fd = None
        os.close(self._lock_fd)

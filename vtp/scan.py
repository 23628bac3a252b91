"""Look for another region's identifiers wherever a region keeps anything: every message
of every topic of its broker, every table of its warehouse, every file of its folders.

The identifiers are VINs, owner ids and positions (latitude/longitude values of six
decimals, as vehicles report them). Strings are searched as bytes in keys, values,
headers, table rows and files; positions are searched in decoded messages (Avro and
JSON), as text in rows and files, and as the 8-byte doubles Avro and ClickHouse write.
A report counts what was read, so "no hit" is never "nothing was looked at".
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from schemas import FramingError, default_store
from vtp.core.kafka import retry_kafka
from vtp.core.settings import Settings
from vtp.core.warehouse import Warehouse, rows

if TYPE_CHECKING:
    from producers.simulator import Vehicle

_NUMBER = re.compile(rb"-?\d{1,3}\.\d{4,6}(?!\d)")


@dataclass(frozen=True)
class Identifiers:
    strings: frozenset[str]
    positions: frozenset[float]  # six-decimal latitudes and longitudes
    _pattern: re.Pattern[bytes] | None = field(init=False, repr=False, compare=False)
    _doubles: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Values with fewer than four decimals could be a speed or a state of charge.
        precise = frozenset(p for p in self.positions if abs(round(p, 3) - p) > 1e-9)
        object.__setattr__(self, "positions", precise)
        pattern = b"|".join(re.escape(s.encode()) for s in sorted(self.strings, key=len)[::-1])
        object.__setattr__(self, "_pattern", re.compile(pattern) if pattern else None)
        object.__setattr__(self, "_doubles", np.array(sorted(precise), dtype="<f8"))

    def strings_in(self, data: bytes) -> set[str]:
        if self._pattern is None:
            return set()
        return {m.group().decode() for m in self._pattern.finditer(data)}

    def position_texts_in(self, data: bytes) -> set[float]:
        # Exact: a position written as text reads back as the same double; a 32-bit
        # float of another quantity (a speed, a charge) never does.
        return {v for m in _NUMBER.finditer(data) if (v := float(m.group())) in self.positions}

    def position_doubles_in(self, data: bytes) -> set[float]:
        doubles = self._doubles
        if not len(doubles) or len(data) < 8:
            return set()
        found: set[float] = set()
        for shift in range(8):
            count = (len(data) - shift) // 8
            values = np.frombuffer(data, dtype="<f8", count=count, offset=shift)
            at = np.minimum(np.searchsorted(doubles, values), len(doubles) - 1)
            found.update(float(v) for v in values[doubles[at] == values])
        return found

    def in_value(self, value: object) -> set[str]:
        """Identifiers in a decoded record (nested dicts/lists)."""
        found: set[str] = set()
        for leaf in _leaves(value):
            if isinstance(leaf, float) and leaf in self.positions:
                found.add(f"position {leaf}")
            elif isinstance(leaf, str) and leaf in self.strings:
                found.add(leaf)
        return found


def _leaves(value: object) -> Iterator[object]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


@dataclass(frozen=True)
class Hit:
    place: str
    identifier: str


@dataclass
class ScanReport:
    read: Counter[str] = field(default_factory=Counter)  # what was looked at, by kind
    hits: list[Hit] = field(default_factory=list)

    def add(self, place: str, found: Iterable[str]) -> None:
        self.hits += [Hit(place, f) for f in sorted(found)]

    def merge(self, other: ScanReport) -> None:
        self.read.update(other.read)
        self.hits += other.hits

    def summary(self) -> str:
        read = ", ".join(f"{n} {kind}" for kind, n in sorted(self.read.items()))
        return f"read {read}: {len(self.hits)} identifiers of another region"


def _decoded(value: bytes) -> object | None:
    try:
        return default_store().decode(value)[0]
    except FramingError:
        pass
    try:
        decoded: object = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded


def scan_bytes(ids: Identifiers, data: bytes) -> set[str]:
    data = data.rstrip(b"\0")  # preallocated (index) files: trailing zeros hold nothing
    found = ids.strings_in(data)
    found |= {f"position {p}" for p in ids.position_texts_in(data)}
    found |= {f"position {p}" for p in ids.position_doubles_in(data)}
    return found


def scan_topics(
    bootstrap: str, ids: Identifiers, extra: dict[str, Any] | None = None
) -> ScanReport:
    """Every message of every topic (internal ones included), from the beginning."""
    report = ScanReport()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"vtp-scan-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **(extra or {}),
        }
    )
    try:
        meta = retry_kafka(lambda: consumer.list_topics(timeout=10), "list topics")
        ends: dict[tuple[str, int], int] = {}
        for name, topic in meta.topics.items():
            report.read["topics"] += 1
            for p in topic.partitions:
                # A def, not a lambda with defaults: mypy cannot infer those against
                # retry_kafka's Callable[[], T].
                def watermarks(n: str = name, p: int = p) -> tuple[int, int]:
                    return consumer.get_watermark_offsets(TopicPartition(n, p), timeout=10)

                low, high = retry_kafka(watermarks, "watermarks")
                if high > low:
                    ends[(name, p)] = high
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
        deadline = time.monotonic() + 300
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(2000, timeout=1.0):
                if m.error():
                    continue
                topic_name, partition, offset = m.topic(), m.partition(), m.offset()
                # The stub makes them optional; a message that is not an error has all three.
                assert topic_name is not None and partition is not None and offset is not None
                where = (topic_name, partition)
                report.read["messages"] += 1
                found: set[str] = set()
                # A consumed message's headers are a list of pairs; the stub's type also
                # admits the dict a producer may be given.
                headers = cast("list[tuple[str, bytes | None]] | None", m.headers())
                value = m.value()
                for part in (m.key(), value, *(v for _, v in headers or [])):
                    if part:
                        found |= scan_bytes(ids, part)
                decoded = _decoded(value) if value else None
                if decoded is not None:
                    found |= ids.in_value(decoded)
                report.add(f"topic {topic_name}:{partition}:{offset}", found)
                if offset + 1 >= ends.get(where, 0):
                    ends.pop(where, None)
        if ends:
            raise RuntimeError(f"the scan did not reach the end of {sorted(ends)[:3]}")
    finally:
        consumer.close()
    return report


def scan_warehouse(warehouse: Warehouse, ids: Identifiers) -> ScanReport:
    """Every row of every table and view of the region's warehouse, as text."""
    report = ScanReport()
    for (table,) in rows(
        warehouse.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    ):
        report.read["tables"] += 1
        data = warehouse.query_raw(f"SELECT * FROM `{table}`", None, "TSV")
        report.read["table rows"] += data.count(b"\n")
        found = ids.strings_in(data) | {f"position {p}" for p in ids.position_texts_in(data)}
        report.add(f"table {table}", found)
    return report


def scan_files(root: Path, ids: Identifiers) -> ScanReport:
    """Every file below ``root``: logs, broker segments, warehouse parts, worker state."""
    report = ScanReport()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        try:
            data = path.read_bytes()
        except OSError:
            continue  # removed while scanning (a merged part, a rolled log)
        report.read["files"] += 1
        report.read["file bytes (without preallocated zeros)"] += len(data.rstrip(b"\0"))
        report.add(f"file {path}", scan_bytes(ids, data))
    return report


def foreign_to(
    region: str, vehicles: Iterable[Vehicle], positions: dict[str, set[float]]
) -> Identifiers:
    """What must never be found in ``region``: VINs and owners never registered there,
    and positions of samples that went to another region (``vehicles`` are simulator
    Vehicles with their registration history)."""
    vehicles = list(vehicles)
    periods = [p for v in vehicles for p in v.periods]
    vins_here = {v.vin for v in vehicles if region in v.regions}
    owners_here = {p.owner_id for p in periods if p.region == region and p.owner_id}
    strings = {v.vin for v in vehicles} - vins_here
    strings |= {p.owner_id for p in periods if p.owner_id} - owners_here
    elsewhere = set().union(*(ps for r, ps in positions.items() if r != region))
    return Identifiers(frozenset(strings), frozenset(elsewhere - positions.get(region, set())))


def scan_region(settings: Settings, ids: Identifiers) -> ScanReport:
    """Everything one region keeps: its broker's topics, its warehouse, its folder.
    (The warehouse is opened here, so no process of the region may hold it.)"""
    from vtp.core.warehouse import open_warehouse

    report = scan_topics(settings.bootstrap(), ids, settings.kafka_extra)
    warehouse = open_warehouse(settings)
    try:
        report.merge(scan_warehouse(warehouse, ids))
    finally:
        warehouse.close()
    report.merge(scan_files(settings.home, ids))
    return report

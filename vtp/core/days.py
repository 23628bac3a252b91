"""Local calendar days, fast: a zone's day boundaries are computed once per day crossed."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo


class DayClock:
    """Maps epoch milliseconds to the local date (ISO string) in one time zone."""

    def __init__(self, time_zone: str):
        self.zone = ZoneInfo(time_zone)
        self._start = self._end = 0
        self._day = ""

    def day(self, t_ms: int) -> str:
        if not (self._start <= t_ms < self._end):
            local = datetime.fromtimestamp(t_ms / 1000, self.zone)
            midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
            # A zone's day may be 23 or 25 hours long: compute the next midnight locally.
            next_midnight = (midnight + timedelta(days=1, hours=2)).replace(hour=0)
            next_midnight = next_midnight.replace(tzinfo=self.zone)
            self._start = int(midnight.timestamp() * 1000)
            self._end = int(next_midnight.timestamp() * 1000)
            self._day = midnight.date().isoformat()
        return self._day

    def end_of(self, t_ms: int) -> int:
        """The first millisecond of the local day after the one containing ``t_ms``."""
        self.day(t_ms)
        return self._end


def day_shares(clock: DayClock, start_ms: int, end_ms: int) -> list[tuple[str, int]]:
    """(local date, milliseconds) of the interval [start, end) in each local day it
    touches, in order: what an interval contributes to each day is its share of time."""
    shares, at = [], start_ms
    while at < end_ms:
        upto = min(clock.end_of(at), end_ms)
        shares.append((clock.day(at), upto - at))
        at = upto
    return shares

"""Trips, charging sessions and daily summaries from one vehicle's samples. Pure.

The state of a vehicle is a ``VehicleState`` (``stream_jobs.session_state``, which also
knows its stored form in the changelog-backed Faust table). Samples go into a reorder buffer; those older than the watermark (newest event time
minus the allowed lateness) are released in event-time order into small state
machines. A sample older than what was already released is *too late*: the caller
dead-letters it. Closed trips and charges, and days the watermark has passed, come
out final; the open ones come out provisional (computed on a copy that releases the
whole buffer) in one slot per vehicle (``open_trip``, ``open_charge``), so readers
always see the best current answer and no provisional row outlives its session. A
record's ``version`` grows with every call, so the newest row of a key wins.

A trip starts when the vehicle leaves PARK and ends once it has stayed parked for
``trip_gap_ms``; a gap in the data while moving stays one trip if the odometer moved
plausibly in it. A charge ends once charging has stopped for ``charge_gap_ms``, so an
interrupted and resumed charge is one session. Day totals: the interval between two
consecutive samples is split at every local midnight (the vehicle's time zone) and each
local day gets its share pro rata by time, days without a sample of their own included,
so no day holds more time than it has.

Lateness is a function of the data in arrival order, not of batch boundaries: a sample is
too late when a sample at or after its time was (or, had the buffer been released at that
moment, would have been) released before it arrived. Released is everything up to the
watermark, the newest event time accepted so far minus the allowed lateness.

Ownership is over time: each released sample belongs to the registration period in
force at its event time (``schemas.registry``). When the period changes (a sale, a move,
a deregistration), the old owner's trip, charge and days close final and their open
slots are emptied; the new owner starts from nothing, so neither sees the other's time.
Samples outside any period registered in the state's region are not aggregated (the
sink refuses them too).

An owner's erasure reaches the state too (``forget_owner``): everything it holds of that
owner goes, and it remembers the erasure's horizon so a replayed or delayed sample of the
owner's erased time is never taken in again (``ingest``), as the sink does.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any

from schemas.aggregates import (
    AggregateRecord,
    ChargeRecord,
    DayRecord,
    EmptySlotRecord,
    Kind,
    OpenChargeRecord,
    OpenTripRecord,
    RecordBase,
    TripRecord,
)
from schemas.registry import Period, Registration
from stream_jobs.session_state import Charge, DayTotals, Sample, Trip, VehicleState
from vtp.core.days import DayClock, day_shares

# What advance() and flush() emit: trip, charge, day and open-slot records, as the
# aggregates topic carries them (schemas/AggregateRecord.v1.avsc).
Record = AggregateRecord


@dataclass(frozen=True)
class SessionConfig:
    trip_gap_ms: int = 300_000
    charge_gap_ms: int = 300_000
    allowed_lateness_ms: int = 120_000
    max_speed_kmh: float = 250.0
    recent_uploads: int = 64


_CLOCKS: dict[str, DayClock] = {}


def _clock(zone: str) -> DayClock:
    clock = _CLOCKS.get(zone)
    if clock is None:
        clock = _CLOCKS[zone] = DayClock(zone)
    return clock


# A sample's place in the reorder buffer: (event time, seq), its first two fields.
_order = itemgetter(0, 1)
_event_time = itemgetter(0)


def new_state(vin: str, region: str, time_zone: str, capacity_kwh: float | None) -> VehicleState:
    """A vehicle's state in ``region``; its owner comes from the registration period of
    each sample as it is released (``period`` is that period's start)."""
    return VehicleState(vin, region, time_zone or "UTC", capacity_kwh)


@dataclass(frozen=True)
class Ingested:
    accepted: int
    too_late: list[int]  # seq of samples older than what was already released
    duplicate_upload: bool = False


def ingest(
    state: VehicleState,
    upload: dict[str, Any],
    config: SessionConfig,
    registration: Registration | None,
    source: tuple[str, int] | None = None,
    received_ms: int | None = None,
) -> Ingested:
    """Buffer an upload's samples; nothing is released here. Samples outside every
    period registered in the state's region are left out, and so are samples of an
    erased owner's time (``forget_owner``).

    ``source`` is (topic-partition, offset) of the message: a vehicle's messages share
    one partition, so an offset at or below the last one applied is a replay after a
    restart, skipped however far back it goes. ``received_ms``: when the upload reached
    vtp (an upload in the pipeline when its owner erased is gone with the rest)."""
    if received_ms is not None:
        state.touched = max(state.touched or 0, received_ms)
    if source is not None:
        where, offset = source
        if offset <= state.applied.get(where, -1):
            return Ingested(0, [], duplicate_upload=True)
        state.applied[where] = offset
    if upload["upload_id"] in state.recent:
        return Ingested(0, [], duplicate_upload=True)
    state.recent = [*state.recent, upload["upload_id"]][-config.recent_uploads :]
    released_t = state.released
    buffered = {s.seq for s in state.buffer}
    accepted, late = 0, []
    for raw in upload["samples"]:
        t = raw["event_time_ms"]
        period = registration.here(state.region, t) if registration else None
        if period is None or period.owner_id is None:
            continue
        horizon = state.erased.get(period.owner_id)
        if horizon is not None and (t <= horizon or (received_ms or horizon + 1) <= horizon):
            continue
        frontier = _released_frontier(state, config, released_t)
        if frontier is not None and t <= frontier:
            late.append(raw["seq"])
        elif raw["seq"] not in buffered:
            bisect.insort(state.buffer, Sample.of(raw), key=_order)
            buffered.add(raw["seq"])
            accepted += 1
            if state.max_t is None or t > state.max_t:
                state.max_t = t
    return Ingested(accepted, late)


ERASURES_REMEMBERED = 8  # per vehicle: owners who erased while it was theirs


def forget_owner(
    state: VehicleState, owner_id: str, horizon_ms: int, registration: Registration | None
) -> bool:
    """Remove from the state everything of ``owner_id``: its trip, charge, days and last
    sample when the state aggregates for it, and its samples in the reorder buffer.
    Nothing is emitted (the owner's rows are being deleted); the owner's later samples
    start from nothing. Returns whether anything was removed.

    Samples of the owner still buffered go whatever their time: they reached vtp before
    the erasure was seen here, and a few of them may belong to the owner's new data (at
    most the allowed lateness of it is lost to aggregation; the samples are stored)."""
    before = len(state.buffer)
    state.buffer = [
        s for s in state.buffer if _owner_at(registration, state.region, s.t) != owner_id
    ]
    removed = len(state.buffer) != before
    if state.owner_id == owner_id:
        state.owner_id = state.period = state.last = state.trip = state.charge = None
        state.days = {}
        removed = True
    erased = state.erased
    erased[owner_id] = max(erased.get(owner_id, horizon_ms), horizon_ms)
    while len(erased) > ERASURES_REMEMBERED:
        del erased[min(erased, key=erased.__getitem__)]
    return removed


def _owner_at(registration: Registration | None, region: str, t: int) -> str | None:
    period = registration.here(region, t) if registration else None
    return period.owner_id if period else None


def _released_frontier(
    state: VehicleState, config: SessionConfig, released_t: int | None
) -> int | None:
    """The newest event time that is released, or would be if the buffer were released now."""
    if state.max_t is None:
        return released_t
    watermark = state.max_t - config.allowed_lateness_ms
    i = bisect.bisect_right(state.buffer, watermark, key=_event_time)
    if i == 0:
        return released_t
    newest = state.buffer[i - 1].t
    return newest if released_t is None else max(released_t, newest)


def advance(
    state: VehicleState,
    config: SessionConfig,
    registration: Registration | None,
    close_ended: bool = False,
) -> list[Record]:
    """Release what the watermark allows; return final and provisional records.

    A registration period that has ended closes its owner's sessions once the watermark
    passes its end, or at once with ``close_ended`` (the registry changed and no more
    samples may come here: the vehicle was sold, moved or deregistered)."""
    state.version += 1
    out: list[Record] = []
    watermark = None
    if state.max_t is not None:
        watermark = state.max_t - config.allowed_lateness_ms
        _release(state, config, out, watermark, registration)
        _close_days(state, out, everything=False)
    end = _end_of_current_period(state, registration)
    if end is not None and (close_ended or (watermark is not None and watermark >= end)):
        _release(state, config, out, end - 1, registration)
        _switch_owner(state, None, out)
        # Anything about the ended period that arrives later is too late for it.
        state.released = end - 1 if state.released is None else max(state.released, end - 1)
    preview = _preview_copy(state)
    closed_in_preview: list[Record] = []
    _release(preview, config, closed_in_preview, None, registration, provisional=True)
    # A session the preview closes lies wholly before the watermark when its gap is at
    # least the allowed lateness, so no late sample can move its start (its key): it is
    # emitted provisionally. Otherwise it waits; the open slot shows the rest.
    stable = {
        "trip": config.trip_gap_ms >= config.allowed_lateness_ms,
        "charge": config.charge_gap_ms >= config.allowed_lateness_ms,
    }
    out.extend(r for r in closed_in_preview if stable[r["kind"]])
    out.extend(_open_records(preview))
    return out


def _preview_copy(state: VehicleState) -> VehicleState:
    """Enough of a copy to release the buffer without touching the state: samples are
    immutable, so the accumulators are copied one level deep and samples shared."""
    return replace(
        state,
        buffer=list(state.buffer),
        trip=replace(state.trip) if state.trip else None,
        charge=replace(state.charge) if state.charge else None,
        days={date: replace(day) for date, day in state.days.items()},
    )


def _end_of_current_period(state: VehicleState, registration: Registration | None) -> int | None:
    """When the period the state aggregates for ended (None while it lasts); a vehicle
    that left the registry ends it at once."""
    if state.period is None:
        return None
    if registration is None:
        return state.released + 1 if state.released is not None else state.period
    period = registration.period_at(state.period)
    if period is None or period.from_ms != state.period or period.owner_id != state.owner_id:
        return state.period  # the registry no longer holds that period: it ended at once
    return registration.end_of(period)


def _close_everything(state: VehicleState, out: list[Record]) -> None:
    """The owner's trip, charge and days final, and both open slots emptied."""
    if state.owner_id is None:
        return
    if state.trip is not None:
        out.append(_trip_record(state, state.trip, final=True))
        state.trip = None
    if state.charge is not None:
        out.append(_charge_record(state, state.charge, final=True))
        state.charge = None
    _close_days(state, out, everything=True)
    out.extend(_open_records(state))  # both slots now inactive


def _switch_owner(state: VehicleState, period: Period | None, out: list[Record]) -> None:
    """The old owner's sessions and days close; the state then aggregates for
    ``period``'s owner (or nobody), from nothing."""
    _close_everything(state, out)
    state.owner_id = period.owner_id if period else None
    state.period = period.from_ms if period else None
    state.last = None


def flush(
    state: VehicleState, config: SessionConfig, registration: Registration | None
) -> list[Record]:
    """End of the stream (tests, shutdown of a vehicle): everything final."""
    state.version += 1
    out: list[Record] = []
    _release(state, config, out, None, registration)
    _close_everything(state, out)
    return out


def _release(
    state: VehicleState,
    config: SessionConfig,
    out: list[Record],
    until: int | None,
    registration: Registration | None,
    provisional: bool = False,
) -> None:
    buffer = state.buffer  # kept in event-time order by ingest
    cut = (
        len(buffer)
        if until is None
        else next((i for i, s in enumerate(buffer) if s.t > until), len(buffer))
    )
    for i, sample in enumerate(buffer[:cut]):
        period = registration.here(state.region, sample.t) if registration else None
        if period is None:
            continue  # not this region's vehicle at that moment
        if period.from_ms != state.period or period.owner_id != state.owner_id:
            if provisional and state.owner_id is not None:
                # A preview shows the current owner's open sessions; the next owner's
                # appear once the watermark passes the change.
                cut = i
                break
            _switch_owner(state, period, out)
        _step(state, sample, config, out, provisional)
        if not provisional:
            state.released = sample.t
    state.buffer = buffer[cut:]


def _step(
    state: VehicleState, s: Sample, config: SessionConfig, out: list[Record], provisional: bool
) -> None:
    prev = state.last
    _day(state, _clock(state.time_zone).day(s.t)).samples += 1
    if prev is not None:
        _accumulate_days(state, prev, s, config)
    _track_trip(state, s, config, out, provisional)
    _track_charge(state, prev, s, config, out, provisional)
    state.last = s


def _day(state: VehicleState, date: str) -> DayTotals:
    day = state.days.get(date)
    if day is None:
        day = state.days[date] = DayTotals(date)
    return day


def _accumulate_days(state: VehicleState, prev: Sample, s: Sample, config: SessionConfig) -> None:
    """What happened between two samples, shared out over the local days it spans."""
    dt = s.t - prev.t
    if dt <= 0:
        return
    moved = 0.0
    if prev.odometer is not None and s.odometer is not None and s.odometer > prev.odometer:
        moved = s.odometer - prev.odometer
    d_soc = s.soc - prev.soc if s.soc is not None and prev.soc is not None else 0.0
    for date, ms in day_shares(_clock(state.time_zone), prev.t, s.t):
        day, share = _day(state, date), ms / dt
        day.distance_km += moved * share
        if prev.moving:
            if s.moving and dt <= config.trip_gap_ms:
                day.driving_ms += ms
            day.soc_used += max(0.0, -d_soc) * share
        elif prev.charging:
            day.soc_charged += max(0.0, d_soc) * share
        else:
            day.soc_idle_drain += max(0.0, -d_soc) * share
            day.parked_ms += ms


def _track_trip(
    state: VehicleState, s: Sample, config: SessionConfig, out: list[Record], provisional: bool
) -> None:
    trip = state.trip
    if trip is not None:
        last = trip.last
        gap = s.t - last.t
        if s.moving:
            if gap > config.trip_gap_ms and (
                trip.parked_since is not None or not _moved_in_gap(last, s, config)
            ):
                out.append(_trip_record(state, trip, final=not provisional))
                state.trip = trip = None
            else:
                trip.last = s
                trip.parked_since = None
                trip.max_speed = max(trip.max_speed, s.speed or 0.0)
                if s.outside_temp is not None:
                    trip.outside_sum += s.outside_temp
                    trip.outside_n += 1
        else:
            if trip.parked_since is None:
                trip.parked_since = s.t
            if gap >= config.trip_gap_ms:
                out.append(_trip_record(state, trip, final=not provisional))
                state.trip = trip = None
    if trip is None and s.moving:
        state.trip = Trip(
            first=s,
            last=s,
            parked_since=None,
            max_speed=s.speed or 0.0,
            outside_sum=s.outside_temp or 0.0,
            outside_n=int(s.outside_temp is not None),
        )
        _day(state, _clock(state.time_zone).day(s.t)).trips += 1


def _moved_in_gap(a: Sample, b: Sample, config: SessionConfig) -> bool:
    """Across a gap in the data, did the car keep driving? Ask the odometer."""
    if a.odometer is None or b.odometer is None:
        return False
    hours = (b.t - a.t) / 3_600_000
    moved = b.odometer - a.odometer
    return moved > 0.05 and moved / hours <= config.max_speed_kmh


def _track_charge(
    state: VehicleState,
    prev: Sample | None,
    s: Sample,
    config: SessionConfig,
    out: list[Record],
    provisional: bool,
) -> None:
    charge = state.charge
    if charge is not None:
        last = charge.last
        if s.charging:
            if charge.stopped_since is not None and s.t - last.t > config.charge_gap_ms:
                out.append(_charge_record(state, charge, final=not provisional))
                state.charge = charge = None
            else:
                if prev is not None and prev.charging and prev.power_kw is not None:
                    # metered between two charging samples, not across a pause
                    charge.metered_kwh += prev.power_kw * (s.t - prev.t) / 3_600_000
                charge.last = s
                charge.stopped_since = None
                charge.peak_kw = max(charge.peak_kw, s.power_kw or 0.0)
                charge.mode = charge.mode or s.charge_mode
        else:
            if charge.stopped_since is None:
                charge.stopped_since = s.t
            if s.t - last.t >= config.charge_gap_ms:
                out.append(_charge_record(state, charge, final=not provisional))
                state.charge = charge = None
    if charge is None and s.charging:
        state.charge = Charge(
            first=s,
            last=s,
            stopped_since=None,
            peak_kw=s.power_kw or 0.0,
            metered_kwh=0.0,
            mode=s.charge_mode,
        )
        _day(state, _clock(state.time_zone).day(s.t)).charges += 1


def _close_days(state: VehicleState, out: list[Record], everything: bool) -> None:
    """A day is final once a later day's sample was released: anything older is too late."""
    current = _clock(state.time_zone).day(state.last.t) if state.last else None
    for date in sorted(state.days):
        if everything or (current is not None and date < current):
            out.append(_day_record(state, state.days.pop(date), final=True))


def _open_records(preview: VehicleState) -> list[Record]:
    """The vehicle's open trip and open charge slots (``active`` False when empty), and
    every day not yet final."""
    if preview.owner_id is None:
        return []
    as_of = preview.max_t  # what an empty slot is about: the state then
    trip_slot: OpenTripRecord | EmptySlotRecord
    charge_slot: OpenChargeRecord | EmptySlotRecord
    if preview.trip is not None:
        trip = _trip_record(preview, preview.trip, final=False)
        trip_slot = {**trip, "kind": "open_trip", "active": True, "as_of_ms": as_of}
    else:
        base = _base(preview, "open_trip", final=False)
        trip_slot = {**base, "active": False, "as_of_ms": as_of}
    if preview.charge is not None:
        charge = _charge_record(preview, preview.charge, final=False)
        charge_slot = {**charge, "kind": "open_charge", "active": True, "as_of_ms": as_of}
    else:
        base = _base(preview, "open_charge", final=False)
        charge_slot = {**base, "active": False, "as_of_ms": as_of}
    days: list[Record] = [_day_record(preview, day, final=False) for day in preview.days.values()]
    return [trip_slot, charge_slot, *days]


def _kwh(state: VehicleState, soc_points: float | None) -> float | None:
    if state.capacity_kwh is None or soc_points is None:
        return None
    return soc_points / 100 * state.capacity_kwh


def _base(state: VehicleState, kind: Kind, final: bool) -> RecordBase:
    assert state.owner_id is not None  # nothing is emitted for a state without an owner
    return {
        "kind": kind,
        "vin": state.vin,
        "owner_id": state.owner_id,
        "region": state.region,
        "final": final,
        "version": state.version,
    }


def _trip_record(state: VehicleState, trip: Trip, final: bool) -> TripRecord:
    first, last = trip.first, trip.last
    duration_s = (last.t - first.t) / 1000
    distance = (
        last.odometer - first.odometer
        if first.odometer is not None and last.odometer is not None
        else 0.0
    )
    soc_used = first.soc - last.soc if first.soc is not None and last.soc is not None else None
    return {
        **_base(state, "trip", final),
        "start_ms": first.t,
        "end_ms": last.t,
        "duration_s": duration_s,
        "start_lat": first.lat,
        "start_lon": first.lon,
        "end_lat": last.lat,
        "end_lon": last.lon,
        "start_odometer": first.odometer,
        "end_odometer": last.odometer,
        "distance_km": distance,
        "avg_speed_kmh": distance / (duration_s / 3600) if duration_s > 0 else 0.0,
        "max_speed_kmh": trip.max_speed,
        "start_soc": first.soc,
        "end_soc": last.soc,
        "soc_used": soc_used,
        "energy_kwh": _kwh(state, soc_used),
        "outside_temp_avg": trip.outside_sum / trip.outside_n if trip.outside_n else None,
    }


def _charge_record(state: VehicleState, charge: Charge, final: bool) -> ChargeRecord:
    first, last = charge.first, charge.last
    duration_s = (last.t - first.t) / 1000
    soc_added = last.soc - first.soc if first.soc is not None and last.soc is not None else None
    energy = _kwh(state, soc_added)
    return {
        **_base(state, "charge", final),
        "start_ms": first.t,
        "end_ms": last.t,
        "duration_s": duration_s,
        "lat": first.lat,
        "lon": first.lon,
        "start_soc": first.soc,
        "end_soc": last.soc,
        "energy_added_kwh": energy if energy is not None else charge.metered_kwh,
        "energy_metered_kwh": charge.metered_kwh,
        "peak_power_kw": charge.peak_kw,
        "avg_power_kw": charge.metered_kwh / (duration_s / 3600) if duration_s > 0 else 0.0,
        "mode": charge.mode,
    }


def _day_record(state: VehicleState, day: DayTotals, final: bool) -> DayRecord:
    used = _kwh(state, day.soc_used)
    return {
        **_base(state, "day", final),
        "date": day.date,
        "time_zone": state.time_zone,
        "samples": day.samples,
        "distance_km": day.distance_km,
        "driving_s": day.driving_ms / 1000,
        "energy_used_kwh": used,
        "energy_charged_kwh": _kwh(state, day.soc_charged),
        "idle_drain_kwh": _kwh(state, day.soc_idle_drain),
        "parked_s": day.parked_ms / 1000,
        "trips": day.trips,
        "charges": day.charges,
        "efficiency_wh_per_km": (
            used * 1000 / day.distance_km if used is not None and day.distance_km > 0.1 else None
        ),
    }

"""Trips, charging sessions and daily summaries from one vehicle's samples. Pure.

The state of a vehicle is a plain dict (it lives in a changelog-backed Faust table).
Samples go into a reorder buffer; those older than the watermark (newest event time
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
from dataclasses import dataclass
from typing import Any

from schemas.registry import Period, Registration
from vtp.core.days import DayClock, day_shares


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


def _order(sample: dict) -> tuple[int, int]:
    return sample["t"], sample["seq"]


def new_state(vin: str, region: str, time_zone: str, capacity_kwh: float | None) -> dict:
    """A vehicle's state in ``region``; its owner comes from the registration period of
    each sample as it is released (``period`` is that period's start)."""
    return {
        "vin": vin, "owner_id": None, "region": region, "period": None, "tz": time_zone or "UTC",
        "capacity": capacity_kwh, "buffer": [], "max_t": None, "last": None, "released": None,
        "trip": None, "charge": None, "days": {}, "recent": [], "version": 0,
    }  # fmt: skip


def compact(sample: dict[str, Any]) -> dict[str, Any]:
    """The fields the state machines use, under short names (the state is stored)."""
    return {
        "t": sample["event_time_ms"], "seq": sample["seq"], "v": sample.get("speed"),
        "odo": sample.get("odometer"), "soc": sample.get("soc"),
        "lat": sample.get("latitude"), "lon": sample.get("longitude"),
        "mv": sample.get("gear") not in (None, "PARK") or (sample.get("speed") or 0) > 0,
        "chg": bool(sample.get("is_charging")), "pw": sample.get("charge_power"),
        "mode": sample.get("charge_mode"), "out": sample.get("outside_temperature"),
    }  # fmt: skip


@dataclass(frozen=True)
class Ingested:
    accepted: int
    too_late: list[int]  # seq of samples older than what was already released
    duplicate_upload: bool = False


def ingest(
    state: dict,
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
        state["touched"] = max(state.get("touched") or 0, received_ms)
    if source is not None:
        where, offset = source
        if offset <= state.setdefault("applied", {}).get(where, -1):
            return Ingested(0, [], duplicate_upload=True)
        state["applied"][where] = offset
    if upload["upload_id"] in state["recent"]:
        return Ingested(0, [], duplicate_upload=True)
    state["recent"] = (state["recent"] + [upload["upload_id"]])[-config.recent_uploads :]
    released_t = state["released"]
    buffered = {s["seq"] for s in state["buffer"]}
    accepted, late = 0, []
    erased = state.get("erased") or {}
    for sample in upload["samples"]:
        t = sample["event_time_ms"]
        period = registration.here(state["region"], t) if registration else None
        if period is None:
            continue
        horizon = erased.get(period.owner_id)
        if horizon is not None and (t <= horizon or (received_ms or horizon + 1) <= horizon):
            continue
        frontier = _released_frontier(state, config, released_t)
        if frontier is not None and t <= frontier:
            late.append(sample["seq"])
        elif sample["seq"] not in buffered:
            bisect.insort(state["buffer"], compact(sample), key=_order)
            buffered.add(sample["seq"])
            accepted += 1
            if state["max_t"] is None or sample["event_time_ms"] > state["max_t"]:
                state["max_t"] = sample["event_time_ms"]
    return Ingested(accepted, late)


ERASURES_REMEMBERED = 8  # per vehicle: owners who erased while it was theirs


def forget_owner(
    state: dict, owner_id: str, horizon_ms: int, registration: Registration | None
) -> bool:
    """Remove from the state everything of ``owner_id``: its trip, charge, days and last
    sample when the state aggregates for it, and its samples in the reorder buffer.
    Nothing is emitted (the owner's rows are being deleted); the owner's later samples
    start from nothing. Returns whether anything was removed.

    Samples of the owner still buffered go whatever their time: they reached vtp before
    the erasure was seen here, and a few of them may belong to the owner's new data (at
    most the allowed lateness of it is lost to aggregation; the samples are stored)."""
    before = len(state["buffer"])
    state["buffer"] = [
        s for s in state["buffer"] if _owner_at(registration, state["region"], s["t"]) != owner_id
    ]
    removed = len(state["buffer"]) != before
    if state["owner_id"] == owner_id:
        state.update(owner_id=None, period=None, last=None, trip=None, charge=None, days={})
        removed = True
    erased = state.setdefault("erased", {})
    erased[owner_id] = max(erased.get(owner_id, horizon_ms), horizon_ms)
    while len(erased) > ERASURES_REMEMBERED:
        del erased[min(erased, key=erased.__getitem__)]
    return removed


def _owner_at(registration: Registration | None, region: str, t: int) -> str | None:
    period = registration.here(region, t) if registration else None
    return period.owner_id if period else None


def _released_frontier(state: dict, config: SessionConfig, released_t: int | None) -> int | None:
    """The newest event time that is released, or would be if the buffer were released now."""
    if state["max_t"] is None:
        return released_t
    watermark = state["max_t"] - config.allowed_lateness_ms
    i = bisect.bisect_right(state["buffer"], watermark, key=lambda sample: sample["t"])
    if i == 0:
        return released_t
    newest = state["buffer"][i - 1]["t"]
    return newest if released_t is None else max(released_t, newest)


def advance(
    state: dict, config: SessionConfig, registration: Registration | None, close_ended: bool = False
) -> list[dict]:
    """Release what the watermark allows; return final and provisional records.

    A registration period that has ended closes its owner's sessions once the watermark
    passes its end, or at once with ``close_ended`` (the registry changed and no more
    samples may come here: the vehicle was sold, moved or deregistered)."""
    state["version"] += 1
    out: list[dict] = []
    watermark = None
    if state["max_t"] is not None:
        watermark = state["max_t"] - config.allowed_lateness_ms
        _release(state, config, out, watermark, registration)
        _close_days(state, out, everything=False)
    end = _end_of_current_period(state, registration)
    if end is not None and (close_ended or (watermark is not None and watermark >= end)):
        _release(state, config, out, end - 1, registration)
        _switch_owner(state, None, out)
        # Anything about the ended period that arrives later is too late for it.
        state["released"] = (
            end - 1 if state["released"] is None else max(state["released"], end - 1)
        )
    preview = _preview_copy(state)
    closed_in_preview: list[dict] = []
    _release(preview, config, closed_in_preview, None, registration, provisional=True)
    # A session the preview closes lies wholly before the watermark when its gap is at
    # least the allowed lateness, so no late sample can move its start (its key): it is
    # emitted provisionally. Otherwise it waits; the open slot shows the rest.
    stable = {"trip": config.trip_gap_ms >= config.allowed_lateness_ms,
              "charge": config.charge_gap_ms >= config.allowed_lateness_ms}  # fmt: skip
    out.extend(r for r in closed_in_preview if stable[r["kind"]])
    out.extend(_open_records(preview))
    return out


def _preview_copy(state: dict) -> dict:
    """Enough of a copy to release the buffer without touching the state: samples are
    never mutated, so the accumulators are copied one level deep and samples shared."""
    preview = dict(state)
    preview["buffer"] = list(state["buffer"])
    preview["trip"] = dict(state["trip"]) if state["trip"] else None
    preview["charge"] = dict(state["charge"]) if state["charge"] else None
    preview["days"] = {date: dict(day) for date, day in state["days"].items()}
    return preview


def _end_of_current_period(state: dict, registration: Registration | None) -> int | None:
    """When the period the state aggregates for ended (None while it lasts); a vehicle
    that left the registry ends it at once."""
    if state["period"] is None:
        return None
    if registration is None:
        return state["released"] + 1 if state["released"] is not None else state["period"]
    period = registration.period_at(state["period"])
    if period is None or period.from_ms != state["period"] or period.owner_id != state["owner_id"]:
        return state["period"]  # the registry no longer holds that period: it ended at once
    return registration.end_of(period)


def _close_everything(state: dict, out: list) -> None:
    """The owner's trip, charge and days final, and both open slots emptied."""
    if state["owner_id"] is None:
        return
    for key in ("trip", "charge"):
        if state[key] is not None:
            out.append(_record(state, key, state[key], final=True))
            state[key] = None
    _close_days(state, out, everything=True)
    out.extend(_open_records(state))  # both slots now inactive


def _switch_owner(state: dict, period: Period | None, out: list) -> None:
    """The old owner's sessions and days close; the state then aggregates for
    ``period``'s owner (or nobody), from nothing."""
    _close_everything(state, out)
    state["owner_id"] = period.owner_id if period else None
    state["period"] = period.from_ms if period else None
    state["last"] = None


def flush(state: dict, config: SessionConfig, registration: Registration | None) -> list[dict]:
    """End of the stream (tests, shutdown of a vehicle): everything final."""
    state["version"] += 1
    out: list[dict] = []
    _release(state, config, out, None, registration)
    _close_everything(state, out)
    return out


def _release(
    state: dict,
    config: SessionConfig,
    out: list,
    until: int | None,
    registration: Registration | None,
    provisional: bool = False,
) -> None:
    buffer = state["buffer"]  # kept in event-time order by ingest
    cut = (
        len(buffer)
        if until is None
        else next((i for i, s in enumerate(buffer) if s["t"] > until), len(buffer))
    )
    for i, sample in enumerate(buffer[:cut]):
        period = registration.here(state["region"], sample["t"]) if registration else None
        if period is None:
            continue  # not this region's vehicle at that moment
        if period.from_ms != state["period"] or period.owner_id != state["owner_id"]:
            if provisional and state["owner_id"] is not None:
                # A preview shows the current owner's open sessions; the next owner's
                # appear once the watermark passes the change.
                cut = i
                break
            _switch_owner(state, period, out)
        _step(state, sample, config, out, provisional)
        if not provisional:
            state["released"] = sample["t"]
    state["buffer"] = buffer[cut:]


def _step(state: dict, s: dict, config: SessionConfig, out: list, provisional: bool) -> None:
    prev = state["last"]
    _day(state, _clock(state["tz"]).day(s["t"]))["samples"] += 1
    if prev is not None:
        _accumulate_days(state, prev, s, config)
    _track_trip(state, prev, s, config, out, provisional)
    _track_charge(state, prev, s, config, out, provisional)
    state["last"] = s


def _day(state: dict, date: str) -> dict:
    day = state["days"].get(date)
    if day is None:
        day = state["days"][date] = {
            "date": date, "samples": 0, "distance_km": 0.0, "driving_ms": 0, "soc_used": 0.0,
            "soc_charged": 0.0, "soc_idle_drain": 0.0, "parked_ms": 0, "trips": 0, "charges": 0,
        }  # fmt: skip
    return day


def _accumulate_days(state: dict, prev: dict, s: dict, config: SessionConfig) -> None:
    """What happened between two samples, shared out over the local days it spans."""
    dt = s["t"] - prev["t"]
    if dt <= 0:
        return
    moved = 0.0
    if prev["odo"] is not None and s["odo"] is not None and s["odo"] > prev["odo"]:
        moved = s["odo"] - prev["odo"]
    d_soc = s["soc"] - prev["soc"] if s["soc"] is not None and prev["soc"] is not None else 0.0
    for date, ms in day_shares(_clock(state["tz"]), prev["t"], s["t"]):
        day, share = _day(state, date), ms / dt
        day["distance_km"] += moved * share
        if prev["mv"]:
            if s["mv"] and dt <= config.trip_gap_ms:
                day["driving_ms"] += ms
            day["soc_used"] += max(0.0, -d_soc) * share
        elif prev["chg"]:
            day["soc_charged"] += max(0.0, d_soc) * share
        else:
            day["soc_idle_drain"] += max(0.0, -d_soc) * share
            day["parked_ms"] += ms


def _track_trip(
    state: dict, prev: dict | None, s: dict, config: SessionConfig, out: list, provisional: bool
) -> None:
    trip = state["trip"]
    if trip is not None:
        last = trip["last"]
        gap = s["t"] - last["t"]
        if s["mv"]:
            if gap > config.trip_gap_ms and (
                trip["parked_since"] is not None or not _moved_in_gap(last, s, config)
            ):
                _close(state, "trip", out, provisional)
                trip = None
            else:
                trip["last"] = s
                trip["parked_since"] = None
                trip["max_v"] = max(trip["max_v"], s["v"] or 0.0)
                if s["out"] is not None:
                    trip["out_sum"] += s["out"]
                    trip["out_n"] += 1
        else:
            if trip["parked_since"] is None:
                trip["parked_since"] = s["t"]
            if gap >= config.trip_gap_ms:
                _close(state, "trip", out, provisional)
                trip = None
    if trip is None and s["mv"]:
        state["trip"] = {"first": s, "last": s, "parked_since": None, "max_v": s["v"] or 0.0,
                         "out_sum": s["out"] or 0.0, "out_n": int(s["out"] is not None)}  # fmt: skip
        _day(state, _clock(state["tz"]).day(s["t"]))["trips"] += 1


def _moved_in_gap(a: dict, b: dict, config: SessionConfig) -> bool:
    """Across a gap in the data, did the car keep driving? Ask the odometer."""
    if a["odo"] is None or b["odo"] is None:
        return False
    hours = (b["t"] - a["t"]) / 3_600_000
    moved = b["odo"] - a["odo"]
    return moved > 0.05 and moved / hours <= config.max_speed_kmh


def _track_charge(
    state: dict, prev: dict | None, s: dict, config: SessionConfig, out: list, provisional: bool
) -> None:
    charge = state["charge"]
    if charge is not None:
        last = charge["last"]
        if s["chg"]:
            if charge["stopped_since"] is not None and s["t"] - last["t"] > config.charge_gap_ms:
                _close(state, "charge", out, provisional)
                charge = None
            else:
                if (
                    prev is not None and prev["chg"] and prev["pw"] is not None
                ):  # not across a pause
                    charge["kwh"] += prev["pw"] * (s["t"] - prev["t"]) / 3_600_000
                charge["last"] = s
                charge["stopped_since"] = None
                charge["peak"] = max(charge["peak"], s["pw"] or 0.0)
                charge["mode"] = charge["mode"] or s["mode"]
        else:
            if charge["stopped_since"] is None:
                charge["stopped_since"] = s["t"]
            if s["t"] - last["t"] >= config.charge_gap_ms:
                _close(state, "charge", out, provisional)
                charge = None
    if charge is None and s["chg"]:
        state["charge"] = {"first": s, "last": s, "stopped_since": None, "peak": s["pw"] or 0.0,
                           "kwh": 0.0, "mode": s["mode"]}  # fmt: skip
        _day(state, _clock(state["tz"]).day(s["t"]))["charges"] += 1


def _close(state: dict, key: str, out: list, provisional: bool) -> None:
    out.append(_record(state, key, state[key], final=not provisional))
    state[key] = None


def _close_days(state: dict, out: list, everything: bool) -> None:
    """A day is final once a later day's sample was released: anything older is too late."""
    current = _clock(state["tz"]).day(state["last"]["t"]) if state["last"] else None
    for date in sorted(state["days"]):
        if everything or (current is not None and date < current):
            out.append(_day_record(state, state["days"].pop(date), final=True))


def _open_records(preview: dict) -> list[dict]:
    """The vehicle's open trip and open charge slots (``active`` False when empty), and
    every day not yet final."""
    if preview["owner_id"] is None:
        return []
    out = []
    for key in ("trip", "charge"):
        if preview[key] is not None:
            rec = _record(preview, key, preview[key], final=False)
        else:
            rec = _base(preview, key, final=False)
        rec["kind"] = f"open_{key}"
        rec["active"] = preview[key] is not None
        rec["as_of_ms"] = preview["max_t"]  # what an empty slot is about: the state then
        out.append(rec)
    out += [_day_record(preview, day, final=False) for day in preview["days"].values()]
    return out


def _kwh(state: dict, soc_points: float) -> float | None:
    return None if state["capacity"] is None else soc_points / 100 * state["capacity"]


def _base(state: dict, kind: str, final: bool) -> dict:
    return {"kind": kind, "vin": state["vin"], "owner_id": state["owner_id"], "region": state["region"],
            "final": final, "version": state["version"]}  # fmt: skip


def _record(state: dict, kind: str, acc: dict, final: bool) -> dict:
    first, last = acc["first"], acc["last"]
    duration_s = (last["t"] - first["t"]) / 1000
    rec = _base(state, kind, final)
    if kind == "trip":
        distance = (
            (last["odo"] - first["odo"])
            if first["odo"] is not None and last["odo"] is not None
            else 0.0
        )
        soc_used = (
            (first["soc"] - last["soc"])
            if first["soc"] is not None and last["soc"] is not None
            else None
        )
        rec.update(
            start_ms=first["t"], end_ms=last["t"], duration_s=duration_s,
            start_lat=first["lat"], start_lon=first["lon"], end_lat=last["lat"], end_lon=last["lon"],
            start_odometer=first["odo"], end_odometer=last["odo"], distance_km=distance,
            avg_speed_kmh=distance / (duration_s / 3600) if duration_s > 0 else 0.0, max_speed_kmh=acc["max_v"],
            start_soc=first["soc"], end_soc=last["soc"], soc_used=soc_used,
            energy_kwh=_kwh(state, soc_used) if soc_used is not None else None,
            outside_temp_avg=acc["out_sum"] / acc["out_n"] if acc["out_n"] else None,
        )  # fmt: skip
    else:
        soc_added = (
            (last["soc"] - first["soc"])
            if first["soc"] is not None and last["soc"] is not None
            else None
        )
        energy = _kwh(state, soc_added) if soc_added is not None else None
        rec.update(
            start_ms=first["t"], end_ms=last["t"], duration_s=duration_s, lat=first["lat"], lon=first["lon"],
            start_soc=first["soc"], end_soc=last["soc"],
            energy_added_kwh=energy if energy is not None else acc["kwh"], energy_metered_kwh=acc["kwh"],
            peak_power_kw=acc["peak"], avg_power_kw=acc["kwh"] / (duration_s / 3600) if duration_s > 0 else 0.0,
            mode=acc["mode"],
        )  # fmt: skip
    return rec


def _day_record(state: dict, day: dict, final: bool) -> dict:
    rec = _base(state, "day", final)
    used = _kwh(state, day["soc_used"])
    rec.update(
        date=day["date"], time_zone=state["tz"], samples=day["samples"], distance_km=day["distance_km"],
        driving_s=day["driving_ms"] / 1000, energy_used_kwh=used,
        energy_charged_kwh=_kwh(state, day["soc_charged"]), idle_drain_kwh=_kwh(state, day["soc_idle_drain"]),
        parked_s=day["parked_ms"] / 1000, trips=day["trips"], charges=day["charges"],
        efficiency_wh_per_km=used * 1000 / day["distance_km"] if used is not None and day["distance_km"] > 0.1 else None,
    )  # fmt: skip
    return rec

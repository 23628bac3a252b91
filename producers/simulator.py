"""A deterministic fleet with ground truth. Pure: no I/O, no clock, no global RNG.

Every vehicle has its own random.Random seeded by (seed, vin), so a vehicle's data does
not depend on which other vehicles are simulated. Each vehicle is a small state machine
(PARKED -> DRIVING -> PARKED -> CHARGING -> ...) sampled at a rate that depends on the
state; its gateway uploads what it collected every ``upload_interval_s`` while driving
and every ``idle_upload_interval_s`` while parked or charging. The
uploads of the whole fleet stream out in sent-at order, and the ground truth (samples,
trips, charges, distance) is recorded from exactly what was yielded.
"""

from __future__ import annotations

import heapq
import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from schemas.registry import Period, Registration, view_for_region
from vtp.core.days import DayClock, day_shares

VIN_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
_VIN_VALUES = (
    dict(zip("ABCDEFGH", range(1, 9), strict=True))
    | dict(zip("JKLMNPR", (1, 2, 3, 4, 5, 7, 9), strict=True))
    | dict(zip("STUVWXYZ", range(2, 10), strict=True))
    | {str(d): d for d in range(10)}
)
_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)

CITIES = {
    "cn": [
        ("Shanghai", 31.2304, 121.4737, "Asia/Shanghai"),
        ("Beijing", 39.9042, 116.4074, "Asia/Shanghai"),
        ("Shenzhen", 22.5431, 114.0579, "Asia/Shanghai"),
    ],
    "eu": [
        ("Berlin", 52.52, 13.405, "Europe/Berlin"),
        ("Paris", 48.8566, 2.3522, "Europe/Paris"),
        ("Madrid", 40.4168, -3.7038, "Europe/Madrid"),
        ("Amsterdam", 52.3676, 4.9041, "Europe/Amsterdam"),
    ],
}
OUTSIDE_C = {"cn": 14.0, "eu": 7.0}
WMI = {"cn": ("LRW", "LFV", "LSV"), "eu": ("WVW", "WBA", "VF1")}
# (model, battery kWh, consumption kWh/km)
MODELS = [
    ("Model 3", 60.0, 0.15),
    ("Model Y", 75.0, 0.17),
    ("ID.4", 77.0, 0.18),
    ("i4 eDrive40", 80.7, 0.19),
    ("Seal", 82.5, 0.16),
]
DTC_CODES = ("P0A80", "P0AA6", "U0100", "C1234", "B1000")

PARKED, DRIVING, CHARGING = "PARKED", "DRIVING", "CHARGING"
_TRUTH_CLOCKS: dict[str, DayClock] = {}


def _truth_clock(zone: str) -> DayClock:
    if zone not in _TRUTH_CLOCKS:
        _TRUTH_CLOCKS[zone] = DayClock(zone)
    return _TRUTH_CLOCKS[zone]


def vin_check_digit(vin: str) -> str:
    total = sum(_VIN_VALUES[c] * w for c, w in zip(vin, _VIN_WEIGHTS, strict=True))
    remainder = total % 11
    return "X" if remainder == 10 else str(remainder)


def make_vin(rng: random.Random, region: str) -> str:
    body = rng.choice(WMI.get(region, ("ZZZ",))) + "".join(rng.choice(VIN_CHARS) for _ in range(5))
    tail = "T" + rng.choice(VIN_CHARS) + "".join(rng.choice("0123456789") for _ in range(6))
    draft = body + "0" + tail
    return body + vin_check_digit(draft) + tail


@dataclass(frozen=True)
class Vehicle:
    vin: str
    owner_id: str
    region: str
    model: str
    battery_capacity_kwh: float
    time_zone: str
    home_lat: float
    home_lon: float
    consumption_kwh_per_km: float = 0.17
    # Registration history (sales, moves, deregistration); empty: ``owner_id`` in
    # ``region`` from the beginning.
    history: tuple[Period, ...] = ()

    @property
    def periods(self) -> tuple[Period, ...]:
        return self.history or (Period(0, self.owner_id, self.region),)

    def endpoint_at(self, t_ms: int) -> str | None:
        """The region whose gateway the vehicle is provisioned with at ``t_ms`` (a
        deregistered vehicle keeps the last one)."""
        current = None
        for period in self.periods:
            if period.from_ms <= t_ms and period.region:
                current = period.region
        return current

    @property
    def regions(self) -> set[str]:
        return {p.region for p in self.periods if p.region}

    def registration_in(self, region: str) -> Registration:
        """What ``region``'s registry holds of this vehicle (other regions' owners left out)."""
        return view_for_region(
            self.vin,
            self.periods,
            region,
            model=self.model,
            battery_capacity_kwh=self.battery_capacity_kwh,
            time_zone=self.time_zone,
            revision=len(self.periods),
        )


def build_fleet(
    seed: int, owners: int = 30, vehicles: int = 50, regions: tuple[str, ...] = ("cn", "eu")
) -> list[Vehicle]:
    """Owners with 1-3 vehicles each, spread over ``regions`` (every region gets owners)."""
    if not (owners <= vehicles <= 3 * owners):
        raise ValueError(f"{vehicles} vehicles cannot be spread over {owners} owners with 1-3 each")
    if owners < len(regions):
        raise ValueError(f"{owners} owners cannot cover {len(regions)} regions")
    rng = random.Random(f"fleet-{seed}")
    counts = [1] * owners
    for _ in range(vehicles - owners):
        counts[rng.choice([i for i, c in enumerate(counts) if c < 3])] += 1
    fleet, vins = [], set()
    for i, count in enumerate(counts):
        region = regions[i % len(regions)]
        _, lat, lon, tz = rng.choice(CITIES.get(region, CITIES["eu"]))
        for _ in range(count):
            vin = make_vin(rng, region)
            while vin in vins:
                vin = make_vin(rng, region)
            vins.add(vin)
            model, kwh, use = rng.choice(MODELS)
            fleet.append(
                Vehicle(
                    vin,
                    f"owner-{i + 1:04d}",
                    region,
                    model,
                    kwh,
                    tz,
                    round(lat + rng.uniform(-0.1, 0.1), 6),
                    round(lon + rng.uniform(-0.1, 0.1), 6),
                    use,
                )
            )
    return fleet


@dataclass(frozen=True)
class Trip:
    vin: str
    start_ms: int
    end_ms: int
    start_odometer: float
    end_odometer: float
    distance_km: float
    start_soc: float
    end_soc: float
    energy_kwh: float
    max_speed: float
    start_lat: float
    start_lon: float
    end_lat: float
    end_lon: float


@dataclass(frozen=True)
class Charge:
    vin: str
    start_ms: int
    end_ms: int
    start_soc: float
    end_soc: float
    energy_kwh: float
    peak_power_kw: float
    mode: str
    lat: float
    lon: float


@dataclass
class VehicleTruth:
    vin: str
    owner_id: str
    region: str
    capacity_kwh: float = 0.0
    time_zone: str = "UTC"
    samples: int = 0
    uploads: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    first_odometer: float | None = None
    last_odometer: float | None = None
    last_soc: float | None = None
    dtcs: int = 0
    trips: list[Trip] = field(default_factory=list)
    charges: list[Charge] = field(default_factory=list)
    # Per local day, from the physics (not from the samples): distance_km, driving_s,
    # energy_used_kwh, energy_charged_kwh, idle_drain_kwh.
    physics: dict[str, dict[str, float]] = field(default_factory=dict)
    _open_trip: list[Any] | None = field(default=None, repr=False)  # [first, last, max_speed]
    _open_charge: list[Any] | None = field(default=None, repr=False)  # [first, last, peak]

    def add_physics(
        self, start_ms: int, end_ms: int, state: str, km: float, kwh: float, still_moving: bool
    ) -> None:
        """What one step of physics did, shared out over the local days it spans."""
        for date, ms in day_shares(_truth_clock(self.time_zone), start_ms, end_ms):
            share = ms / (end_ms - start_ms)
            day = self.physics.setdefault(
                date,
                {
                    "distance_km": 0.0,
                    "driving_s": 0.0,
                    "energy_used_kwh": 0.0,
                    "energy_charged_kwh": 0.0,
                    "idle_drain_kwh": 0.0,
                },
            )
            day["distance_km"] += km * share
            if state == DRIVING:
                day["energy_used_kwh"] -= kwh * share
                if still_moving:
                    day["driving_s"] += ms / 1000
            elif state == CHARGING:
                day["energy_charged_kwh"] += kwh * share
            else:
                day["idle_drain_kwh"] -= kwh * share

    def daily(self) -> dict[str, dict[str, float]]:
        """Day totals as the owner should see them: physics plus trips and charges begun."""
        clock = _truth_clock(self.time_zone)
        days = {d: dict(v, trips=0, charges=0) for d, v in self.physics.items()}
        for trip in self.trips:
            days.setdefault(clock.day(trip.start_ms), {}).setdefault("trips", 0)
            days[clock.day(trip.start_ms)]["trips"] += 1
        for charge in self.charges:
            days.setdefault(clock.day(charge.start_ms), {}).setdefault("charges", 0)
            days[clock.day(charge.start_ms)]["charges"] += 1
        return days

    @property
    def distance_km(self) -> float:
        if self.first_odometer is None or self.last_odometer is None:
            return 0.0
        return self.last_odometer - self.first_odometer

    def record(self, samples: list[dict[str, Any]]) -> None:
        """Account for one yielded upload."""
        self.uploads += 1
        self.samples += len(samples)
        for s in samples:
            if self.first_ms is None:
                self.first_ms, self.first_odometer = s["event_time_ms"], s["odometer"]
            self.last_ms, self.last_odometer, self.last_soc = (
                s["event_time_ms"],
                s["odometer"],
                s["soc"],
            )
            self.dtcs += len(s["dtcs"])
            self._track_trip(s)
            self._track_charge(s)

    def _track_trip(self, s: dict[str, Any]) -> None:
        moving = s["gear"] != "PARK"
        if moving:
            if self._open_trip is None:
                self._open_trip = [s, s, s["speed"]]
            else:
                self._open_trip[1] = s
                self._open_trip[2] = max(self._open_trip[2], s["speed"])
        elif self._open_trip is not None:
            self._close_trip()

    def _close_trip(self) -> None:
        assert self._open_trip is not None  # called only while a trip is open
        first, last, top = self._open_trip
        self._open_trip = None
        self.trips.append(
            Trip(
                self.vin,
                first["event_time_ms"],
                last["event_time_ms"],
                first["odometer"],
                last["odometer"],
                last["odometer"] - first["odometer"],
                first["soc"],
                last["soc"],
                (first["soc"] - last["soc"]) / 100 * self.capacity_kwh,
                top,
                first["latitude"],
                first["longitude"],
                last["latitude"],
                last["longitude"],
            )
        )

    def _track_charge(self, s: dict[str, Any]) -> None:
        if s["is_charging"]:
            if self._open_charge is None:
                self._open_charge = [s, s, s["charge_power"]]
            else:
                self._open_charge[1] = s
                self._open_charge[2] = max(self._open_charge[2], s["charge_power"])
        elif self._open_charge is not None:
            self._close_charge()

    def _close_charge(self) -> None:
        assert self._open_charge is not None  # called only while a charge is open
        first, last, peak = self._open_charge
        self._open_charge = None
        self.charges.append(
            Charge(
                self.vin,
                first["event_time_ms"],
                last["event_time_ms"],
                first["soc"],
                last["soc"],
                (last["soc"] - first["soc"]) / 100 * self.capacity_kwh,
                peak,
                first["charge_mode"],
                first["latitude"],
                first["longitude"],
            )
        )

    def finish(self) -> None:
        """Trips and charges still going at the end of the simulation count as they are."""
        if self._open_trip is not None:
            self._close_trip()
        if self._open_charge is not None:
            self._close_charge()


@dataclass
class GroundTruth:
    vehicles: dict[str, VehicleTruth]

    def totals(self) -> dict[str, int]:
        return {
            "uploads": sum(t.uploads for t in self.vehicles.values()),
            "samples": sum(t.samples for t in self.vehicles.values()),
        }

    def by_owner(self, owner_id: str) -> list[VehicleTruth]:
        return sorted(
            (t for t in self.vehicles.values() if t.owner_id == owner_id), key=lambda t: t.vin
        )


def new_truth(fleet: list[Vehicle]) -> GroundTruth:
    return GroundTruth(
        {
            v.vin: VehicleTruth(v.vin, v.owner_id, v.region, v.battery_capacity_kwh, v.time_zone)
            for v in fleet
        }
    )


@dataclass
class _Car:
    """Mutable physical state of one vehicle while it is simulated."""

    lat: float
    lon: float
    heading: float
    odometer: float
    soc: float
    battery_c: float
    outside_c: float
    speed: float = 0.0
    target: float = 0.0
    target_until: float = 0.0
    reverse_steps: int = 0  # manoeuvring backwards out of a parking space


def _vehicle_uploads(
    v: Vehicle,
    seed: int,
    start_ms: int,
    duration_s: float,
    intervals: tuple[float, float, float],
    upload_interval_s: float,
    idle_upload_interval_s: float,
    max_samples: int,
    firmware: str,
    truth: VehicleTruth | None,
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    rng = random.Random(f"{seed}-{v.vin}")
    drive_dt, charge_dt, park_dt = intervals
    outside = OUTSIDE_C.get(v.region, 10.0) + rng.uniform(-5, 5)
    car = _Car(
        v.home_lat,
        v.home_lon,
        rng.uniform(0, 360),
        round(rng.uniform(1_000, 80_000), 3),
        rng.uniform(35, 90),
        outside + 5,
        outside,
    )
    state = rng.choices((DRIVING, CHARGING, PARKED), (0.5, 0.2, 0.3))[0]
    if state == CHARGING:
        car.soc = rng.uniform(15, 60)
    mode = rng.choice(("AC", "DC"))
    state_until = rng.uniform(5, 30) * 60
    seq = rng.randrange(1, 1_000_000)
    t = 0.0
    next_upload = rng.uniform(0, upload_interval_s)
    last_sent = start_ms
    buffer: list[dict[str, Any]] = []
    shown_speed = 0.0  # a trip ends on a sample that shows the car stopped
    pending = None
    vehicle_key = hash(v.vin)

    # A vehicle re-provisioned for another region (a move) sends what it holds to the
    # old region's gateway first: an upload never spans a change of endpoint.
    switches = [
        p.from_ms for p in v.periods[1:] if p.region and p.region != v.endpoint_at(p.from_ms - 1)
    ]

    def emit(sent_s: float | None) -> tuple[int, int, dict[str, Any]]:
        nonlocal last_sent, buffer
        sent = (
            last_sent if sent_s is None else start_ms + int(sent_s * 1000) + rng.randrange(0, 800)
        )
        sent = max(last_sent, sent, buffer[-1]["event_time_ms"])
        last_sent = sent
        upload = {
            "vin": v.vin,
            "upload_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "sent_at_ms": sent,
            "gateway_firmware": firmware,
            "samples": buffer,
        }
        if truth is not None:
            truth.record(buffer)
        buffer = []
        return (sent, vehicle_key, upload)

    while t < duration_s:
        if t >= state_until:
            if state == DRIVING and (car.speed > 0 or shown_speed > 0):
                car.target, car.target_until = 0.0, t + 3600  # come to a stop, then park
            else:
                state, state_until, mode = _next_state(state, car, rng, t)
        dt = drive_dt if state == DRIVING else charge_dt if state == CHARGING else park_dt
        # A sample shows the state at t; physics then moves the car to t + dt.
        sample = _sample(car, state, mode, start_ms + int(t * 1000), seq, rng, dt)
        if pending is not None and truth is not None:
            truth.add_physics(*pending, still_moving=sample["gear"] != "PARK")
        before = (car.odometer, car.soc)
        if state == DRIVING:
            _drive(car, rng, t, dt, v)
        elif state == CHARGING:
            _charge(car, sample["charge_power"], v, dt)
            if car.soc >= 99.5:
                state_until = t  # full: unplug at the next step
        else:
            car.soc = max(0.0, car.soc - 0.02 * dt / 3600)  # standby drain, about 0.5 %/day
            car.battery_c += (car.outside_c - car.battery_c) * min(1.0, dt / 3600)
        # What the physics did in this step, from this sample to the next.
        pending = (
            start_ms + int(t * 1000),
            start_ms + int((t + dt) * 1000),
            state,
            car.odometer - before[0],
            (car.soc - before[1]) / 100 * v.battery_capacity_kwh,
        )
        if (
            switches
            and buffer
            and any(buffer[0]["event_time_ms"] < at <= sample["event_time_ms"] for at in switches)
        ):
            yield emit(None)
        buffer.append(sample)
        shown_speed = sample["speed"]
        seq += 1
        t += dt
        if len(buffer) >= max_samples:
            yield emit(t - dt)
        # Gateways upload often while driving and save airtime while parked or charging.
        interval = upload_interval_s if state == DRIVING else idle_upload_interval_s
        next_upload = min(next_upload, t + interval)
        while next_upload <= t:
            if buffer:
                yield emit(next_upload)
            next_upload += interval
    if buffer:
        yield emit(duration_s)
    if truth is not None:
        truth.finish()


def _next_state(state: str, car: _Car, rng: random.Random, t: float) -> tuple[str, float, str]:
    mode = rng.choice(("AC", "DC"))
    if state == PARKED:
        if car.soc < 30 or (car.soc < 75 and rng.random() < 0.2):
            return CHARGING, t + rng.uniform(10, 60) * 60, mode
        car.target_until = t  # pick a new target speed at once
        car.speed = 0.0
        car.reverse_steps = 4 if rng.random() < 0.1 else 0
        return DRIVING, t + rng.uniform(5, 40) * 60, mode
    # Parked at least 10 minutes: longer than the aggregator's default trip/charge gaps,
    # so every simulated trip and charge is one session there too.
    return PARKED, t + rng.uniform(10, 60) * 60, mode


def _drive(car: _Car, rng: random.Random, t: float, dt: float, v: Vehicle) -> None:
    if car.reverse_steps > 0:
        car.reverse_steps -= 1
        distance = car.speed * dt / 3600
        car.odometer += distance  # backwards still adds to the odometer
        car.speed = 3.0 if car.reverse_steps > 1 else 0.0
        return
    distance = car.speed * dt / 3600  # covered at the speed the last sample showed
    if t >= car.target_until:
        car.target = 0.0 if rng.random() < 0.15 else rng.uniform(30, 120)  # 0: a red light
        car.target_until = t + rng.uniform(20, 120)
    step = 3.0 * dt
    gap = car.target - car.speed
    car.speed = car.target if abs(gap) <= step else car.speed + math.copysign(step, gap)
    if car.target > 0:
        car.speed = min(200.0, max(0.0, car.speed + rng.uniform(-0.5, 0.5)))
    car.odometer += distance
    car.soc = max(0.0, car.soc - distance * v.consumption_kwh_per_km / v.battery_capacity_kwh * 100)
    # Wander, but turn back toward home beyond ~20 km.
    away_lat, away_lon = car.lat - v.home_lat, car.lon - v.home_lon
    if away_lat * away_lat + away_lon * away_lon > 0.04:
        home_heading = math.degrees(math.atan2(-away_lon, -away_lat)) % 360
        car.heading += ((home_heading - car.heading + 180) % 360 - 180) * 0.05
    car.heading = (car.heading + rng.gauss(0, 2.0)) % 360
    rad = math.radians(car.heading)
    car.lat += distance * math.cos(rad) / 111.32
    car.lon += distance * math.sin(rad) / (111.32 * max(0.1, math.cos(math.radians(car.lat))))
    car.battery_c += (35.0 - car.battery_c) * min(1.0, dt / 1200)


def _charge(car: _Car, power_kw: float, v: Vehicle, dt: float) -> None:
    energy = power_kw * dt / 3600
    car.soc = min(100.0, car.soc + energy / v.battery_capacity_kwh * 100)
    car.battery_c += (30.0 - car.battery_c) * min(1.0, dt / 1200)


def _charge_power(car: _Car, mode: str) -> float:
    peak = 11.0 if mode == "AC" else 120.0
    if car.soc > 80:
        peak *= max(0.1, (100 - car.soc) / 20)  # taper above 80 %
    return round(peak, 2)


def _sample(
    car: _Car, state: str, mode: str, t_ms: int, seq: int, rng: random.Random, dt: float
) -> dict[str, Any]:
    charging = state == CHARGING
    driving = state == DRIVING
    dtcs = [rng.choice(DTC_CODES)] if driving and rng.random() < dt / 3600 else []
    gear = ("REVERSE" if car.reverse_steps > 0 else "DRIVE") if driving else "PARK"
    return {
        "event_time_ms": t_ms,
        "seq": seq,
        "speed": round(car.speed, 1) if driving else 0.0,
        "latitude": round(car.lat, 6),
        "longitude": round(car.lon, 6),
        "heading": round(car.heading % 360, 1),
        "odometer": round(car.odometer, 3),
        "soc": round(car.soc, 2),
        "is_charging": charging,
        "charge_power": _charge_power(car, mode) if charging else None,
        "charge_mode": mode if charging else None,
        "battery_temperature": round(car.battery_c, 1),
        "outside_temperature": round(car.outside_c, 1),
        "gear": gear,
        "dtcs": dtcs,
    }


def simulate(
    fleet: list[Vehicle],
    *,
    seed: int,
    start_ms: int,
    duration_s: float,
    drive_interval_s: float = 1.0,
    charge_interval_s: float = 10.0,
    park_interval_s: float = 60.0,
    upload_interval_s: float = 10.0,
    idle_upload_interval_s: float = 300.0,
    max_samples_per_upload: int = 60,
    firmware: str = "3.2.1",
    truth: GroundTruth | None = None,
) -> Iterator[dict[str, Any]]:
    """The fleet's uploads in non-decreasing sent-at order, streamed (never materialised)."""
    intervals = (drive_interval_s, charge_interval_s, park_interval_s)
    streams = [
        _vehicle_uploads(
            v,
            seed,
            start_ms,
            duration_s,
            intervals,
            upload_interval_s,
            idle_upload_interval_s,
            max_samples_per_upload,
            firmware,
            truth.vehicles[v.vin] if truth is not None else None,
        )
        for v in fleet
    ]
    for _, _, upload in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
        yield upload

"""The typed session state keeps the stored form older workers wrote, so a worker that
restarts on a new vtp restores every vehicle's state and goes on as if nothing changed."""

from __future__ import annotations

import json

from schemas.registry import Period, Registration
from stream_jobs.session_state import Sample, from_json, to_json, touched_of
from stream_jobs.sessions import SessionConfig, advance, flush, ingest, new_state

REG = Registration(
    "LSVTEST0000000001", (Period(0, "owner-1", "cn"),), "Model 3", 60.0, "Asia/Shanghai", 1
)
T0 = 1_790_000_000_000


def sample(i: int, moving: bool, charging: bool = False) -> dict:
    return {
        "event_time_ms": T0 + i * 60_000,
        "seq": i,
        "speed": 40.0 if moving else 0.0,
        "odometer": 1000 + i,
        "soc": 80 - i,
        "latitude": 31.2,
        "longitude": 121.4,
        "gear": "DRIVE" if moving else "PARK",
        "is_charging": charging,
        "charge_power": 7.0 if charging else None,
        "charge_mode": "AC" if charging else None,
        "outside_temperature": 12.5,
    }


FIRST = {"upload_id": "u1", "samples": [sample(i, i < 3, i >= 4) for i in range(6)]}
LATER = {"upload_id": "u2", "samples": [sample(i, False, True) for i in range(6, 12)]}

# Written by the dict-based state of vtp 0.3.0 after FIRST and one advance.
STORED_BY_0_3_0 = (
    '{"vin":"LSVTEST0000000001","owner_id":"owner-1","region":"cn","period":0,'
    '"tz":"Asia/Shanghai","capacity":60.0,"buffer":[{"t":1790000240000,"seq":4,"v":0.0,'
    '"odo":1004,"soc":76,"lat":31.2,"lon":121.4,"mv":false,"chg":true,"pw":7.0,"mode":"AC",'
    '"out":12.5},{"t":1790000300000,"seq":5,"v":0.0,"odo":1005,"soc":75,"lat":31.2,'
    '"lon":121.4,"mv":false,"chg":true,"pw":7.0,"mode":"AC","out":12.5}],'
    '"max_t":1790000300000,"last":{"t":1790000180000,"seq":3,"v":0.0,"odo":1003,"soc":77,'
    '"lat":31.2,"lon":121.4,"mv":false,"chg":false,"pw":null,"mode":null,"out":12.5},'
    '"released":1790000180000,"trip":{"first":{"t":1790000000000,"seq":0,"v":40.0,'
    '"odo":1000,"soc":80,"lat":31.2,"lon":121.4,"mv":true,"chg":false,"pw":null,"mode":null,'
    '"out":12.5},"last":{"t":1790000120000,"seq":2,"v":40.0,"odo":1002,"soc":78,"lat":31.2,'
    '"lon":121.4,"mv":true,"chg":false,"pw":null,"mode":null,"out":12.5},'
    '"parked_since":1790000180000,"max_v":40.0,"out_sum":37.5,"out_n":3},"charge":null,'
    '"days":{"2026-09-21":{"date":"2026-09-21","samples":4,"distance_km":3.0,'
    '"driving_ms":120000,"soc_used":3.0,"soc_charged":0.0,"soc_idle_drain":0.0,'
    '"parked_ms":0,"trips":1,"charges":0}},"recent":["u1"],"version":1,'
    '"touched":1790000400000,"applied":{"v:0":5}}'
)


def fed_from_scratch():
    state = new_state(REG.vin, "cn", "Asia/Shanghai", 60.0)
    ingest(state, FIRST, SessionConfig(), REG, ("v:0", 5), T0 + 400_000)
    advance(state, SessionConfig(), REG)
    return state


def test_the_stored_form_is_the_one_older_workers_wrote():
    assert json.loads(to_json(fed_from_scratch())) == {
        **json.loads(STORED_BY_0_3_0),
        "erased": {},
    }


def test_a_restored_state_goes_on_exactly_as_one_that_never_stopped():
    restored, running = from_json(STORED_BY_0_3_0), fed_from_scratch()
    assert restored == running
    config = SessionConfig()
    for state in (restored, running):
        ingest(state, LATER, config, REG, ("v:0", 6), T0 + 900_000)
    assert advance(restored, config, REG) == advance(running, config, REG)
    assert flush(restored, config, REG) == flush(running, config, REG)
    assert from_json(to_json(restored)) == restored


def test_samples_keep_what_the_state_machines_need_and_nothing_more():
    s = Sample.of(sample(0, moving=False) | {"gear": None, "speed": 3.0, "vin": "x"})
    assert s.moving and not s.charging and s.t == T0 and s.seq == 0
    assert touched_of(STORED_BY_0_3_0.encode()) == 1790000400000
    assert touched_of(b'{"vin": "x"}') is None

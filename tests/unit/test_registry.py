"""Registrations over time: which owner and region at which moment, per region's view."""

import pytest

from schemas import FramingError, default_store
from schemas.registry import (
    Period,
    Registration,
    decode_registration,
    encode_registration,
    refusal,
    view_for_region,
)

VIN = "WVWZZZ1KZAW000001"
SALE, MOVE, GONE = 1_000, 2_000, 3_000
HISTORY = (
    Period(100, "seller", "eu"),
    Period(SALE, "buyer", "eu"),
    Period(MOVE, "buyer-cn", "cn"),
    Period(GONE, None, None),
)


def test_each_moment_has_the_period_in_force():
    reg = Registration(VIN, HISTORY)
    assert reg.period_at(99) is None
    assert reg.period_at(100).owner_id == "seller" and reg.period_at(SALE - 1).owner_id == "seller"
    assert reg.period_at(SALE).owner_id == "buyer"
    assert reg.here("eu", MOVE - 1).owner_id == "buyer" and reg.here("eu", MOVE) is None
    assert reg.here("cn", MOVE).owner_id == "buyer-cn" and reg.here("cn", GONE) is None
    assert reg.end_of(HISTORY[0]) == SALE and reg.end_of(HISTORY[-1]) is None


def test_an_owner_held_the_vehicle_only_in_their_own_period():
    reg = Registration(VIN, HISTORY)
    assert reg.owned_in("eu", "seller", 0, SALE - 1)
    assert not reg.owned_in("eu", "seller", SALE, SALE + 500)
    assert reg.owned_in("eu", "buyer", SALE - 10, SALE)  # a span that reaches into theirs
    assert not reg.owned_in("cn", "buyer", 0, 10_000)


@pytest.mark.parametrize(
    ("t", "region", "reason"),
    [
        (50, "eu", "not_registered_yet"),
        (SALE, "eu", None),
        (MOVE, "eu", "registered_elsewhere"),
        (GONE, "cn", "deregistered"),
    ],
)
def test_why_data_about_a_moment_may_not_be_stored_here(t, region, reason):
    found = refusal(Registration(VIN, HISTORY), region, t)
    assert (found[0] if found else None) == reason
    assert refusal(None, "eu", t)[0] == "unknown_vin"


def test_a_regions_view_never_holds_another_regions_owners():
    eu = view_for_region(VIN, HISTORY, "eu", revision=4)
    cn = view_for_region(VIN, HISTORY, "cn", revision=4)
    assert [p.owner_id for p in eu.periods] == ["seller", "buyer", None, None]
    assert [p.region for p in eu.periods] == ["eu", "eu", "cn", None]
    assert [p.owner_id for p in cn.periods] == [None, None, "buyer-cn", None]


def test_history_round_trips_and_old_v1_entries_hold_from_the_beginning():
    reg = view_for_region(
        VIN,
        HISTORY,
        "eu",
        model="ID.4",
        battery_capacity_kwh=77.0,
        time_zone="Europe/Berlin",
        revision=4,
    )
    assert decode_registration(encode_registration(reg)) == reg
    store = default_store()
    v1 = store.encode(
        {
            "vin": VIN,
            "owner_id": "o-1",
            "region": "EU",
            "model": "M",
            "battery_capacity_kwh": 75.0,
            "time_zone": "Europe/Paris",
        },
        store.get("VehicleRegistration", 1),
    )
    old = decode_registration(v1)
    assert old.periods == (Period(0, "o-1", "eu"),) and old.revision == 0
    assert old.here("eu", 1) and old.battery_capacity_kwh == 75.0


def test_a_v1_reader_sees_the_current_owner_and_region_of_a_v2_entry():
    store = default_store()
    data = encode_registration(Registration(VIN, HISTORY[:2], revision=2))
    record, _ = store.decode(data, reader=store.get("VehicleRegistration", 1))
    assert (record["owner_id"], record["region"]) == ("buyer", "eu")


def test_periods_out_of_order_are_refused():
    with pytest.raises(ValueError, match="not in time order"):
        Registration(VIN, (HISTORY[1], HISTORY[0]))
    store = default_store()
    bad = store.encode(
        {
            "vin": VIN,
            "owner_id": "",
            "region": "",
            "periods": [
                {"from_ms": 5, "owner_id": "a", "region": "eu"},
                {"from_ms": 1, "owner_id": "b", "region": "eu"},
            ],
        },
        store.get("VehicleRegistration", 2),
    )
    with pytest.raises(FramingError) as caught:
        decode_registration(bad)
    assert caught.value.reason == "invalid_registration"

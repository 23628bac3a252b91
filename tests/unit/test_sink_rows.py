from sinks.classify import sort_against_stored
from sinks.rows import SAMPLES_SCHEMA, StoredUpload, samples_table, uploads_table


def stored(upload_id="u-1", raw_source="vtp.uploads:0:5", offset=1, samples=2, version=1):
    record = {
        "vin": "LRW3E7EK4NC000001",
        "upload_id": upload_id,
        "sent_at_ms": 5_000,
        "gateway_firmware": "3.2.1",
        "samples": [
            {
                "event_time_ms": 1_000 * (i + 1),
                "seq": i,
                "speed": 10.0 + i,
                "gear": "DRIVE",
                "dtcs": ["P0A80"] if i == 0 else [],
            }
            for i in range(samples)
        ],
    }
    return StoredUpload(
        record, "owner-1", "cn", version, 6_000, raw_source, "vtp.validated.cn", 0, offset
    )


def test_samples_table_flattens_uploads_with_owner_and_nulls_for_absent_signals():
    table = samples_table([stored(samples=2), stored("u-2", samples=3)])
    assert table.schema == SAMPLES_SCHEMA
    assert table.num_rows == 5
    rows = table.to_pylist()
    assert rows[0]["owner_id"] == "owner-1" and rows[0]["dtcs"] == ["P0A80"]
    assert rows[0]["soc"] is None and rows[0]["cabin_temperature"] is None
    assert [r["upload_id"] for r in rows] == ["u-1", "u-1", "u-2", "u-2", "u-2"]


def test_uploads_table_has_one_row_per_upload_with_its_sources():
    (row,) = uploads_table([stored(samples=3)]).to_pylist()
    assert row["sample_count"] == 3
    assert row["raw_source"] == "vtp.uploads:0:5" and row["offset"] == 1
    assert row["first_event_time"].timestamp() == 1.0 and row["last_event_time"].timestamp() == 3.0


def test_sort_against_stored_tells_replays_from_resends():
    prior = {"u-1": ("vtp.uploads:0:5", "vtp.validated.cn", 0, 1)}
    same_message = stored(offset=1)  # the sink crashed: same validated offset again
    worker_replay = stored(offset=9)  # same raw message, routed twice
    resend = stored(raw_source="vtp.uploads:0:77", offset=10)  # another raw message
    new = stored("u-2", offset=11)
    fresh, resends, skipped = sort_against_stored([same_message, worker_replay, resend, new], prior)
    assert fresh == [same_message, new]
    assert resends == [resend]
    assert skipped == 1


def test_sort_against_stored_within_one_batch():
    a = stored(offset=1)
    b = stored(offset=2, raw_source="vtp.uploads:3:3")
    fresh, resends, skipped = sort_against_stored([a, b], {})
    assert fresh == [a] and resends == [b] and skipped == 0


def test_an_upload_spanning_a_sale_is_split_between_the_owners_and_the_rest_refused():
    from schemas.registry import Period, Registration
    from sinks.classify import split_by_owner

    up = stored(samples=4)  # samples at 1000, 2000, 3000, 4000 ms
    reg = Registration(
        up.record["vin"],
        (Period(1500, "seller", "cn"), Period(2500, "buyer", "cn"), Period(3500, None, "eu")),
    )
    pieces, outside = split_by_owner(up, reg, "cn")
    assert [(p.owner_id, [s["seq"] for s in p.record["samples"]]) for p in pieces] == [
        ("seller", [1]),
        ("buyer", [2]),
    ]
    assert [s["seq"] for s in outside] == [0, 3]  # before the first period, and after the move
    assert all(p.record["upload_id"] == up.record["upload_id"] for p in pieces)
    # sent (5000) and received (6000) after both owners' time: each sees its own end only
    assert [(p.record["sent_at_ms"], p.received_ms) for p in pieces] == [(2499, 2499), (3499, 3499)]
    ongoing = Registration(up.record["vin"], (Period(0, "owner", "cn"),))
    ((whole,), _) = split_by_owner(up, ongoing, "cn")
    assert (whole.record["sent_at_ms"], whole.received_ms) == (5_000, 6_000)
    assert split_by_owner(up, None, "cn") == ([], up.record["samples"])

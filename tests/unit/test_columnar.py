"""The sink's columnar path, its pure parts: which uploads are stored whole from their
Avro bodies, what stops them being, and the ClickHouse structure the bodies are read by.
tests/integration/test_sink_columnar.py checks the rows the real engine stores."""

from __future__ import annotations

import pyarrow as pa
import pytest
from confluent_kafka import Message

from schemas import default_store
from schemas.registry import Period, Registration
from sinks.columnar import (
    NEWEST,
    STRUCTURE,
    Plain,
    Provenance,
    clickhouse_type,
    facts_match,
    plain_candidates,
    plain_owner,
    still_plain,
    structure,
)
from sinks.rows import StoredUpload

VIN = "LRW3E7EK4NC000001"
SALE = 5_000


def registration(*periods: Period) -> Registration:
    return Registration(VIN, periods)


def test_an_upload_is_plain_only_inside_the_vehicles_open_period_here():
    sold = registration(Period(0, "seller", "eu"), Period(SALE, "buyer", "eu"))
    assert plain_owner(sold, "eu", SALE) == "buyer"
    assert plain_owner(sold, "eu", SALE + 10_000) == "buyer"
    # before the sale: the seller's period has ended, so times are clamped: judged in Python
    assert plain_owner(sold, "eu", SALE - 1) is None
    assert plain_owner(sold, "cn", SALE) is None
    assert plain_owner(None, "eu", SALE) is None
    left = registration(Period(0, "owner", "eu"), Period(SALE, None, None))
    assert plain_owner(left, "eu", SALE + 1) is None
    assert plain_owner(registration(Period(SALE, "owner", "eu")), "eu", SALE - 1) is None


def plain(upload_id: str, offset: int, first_ms: int = 10_000, received_ms: int = 11_000) -> Plain:
    message = Message(topic="vtp.eu.validated", partition=0, offset=offset, key=VIN.encode())
    source = f"vtp.eu.uploads:0:{offset}"
    return Plain(
        message,
        offset,
        "owner",
        upload_id,
        VIN,
        first_ms,
        3,
        Provenance(received_ms, source, offset),
    )


def judged(upload_id: str, offset: int) -> StoredUpload:
    record = {"vin": VIN, "upload_id": upload_id, "samples": []}
    source = f"vtp.eu.uploads:0:{offset}"
    return StoredUpload(record, "owner", "eu", 1, 0, source, "vtp.eu.validated", 0, offset)


def test_an_erasure_at_or_after_an_uploads_time_sends_it_to_be_judged():
    before = plain("a", 1, first_ms=10_000, received_ms=21_000)  # a sample at/before it
    after = plain("b", 2, first_ms=20_000, received_ms=21_000)
    late = plain("c", 3, first_ms=20_000, received_ms=10_500)  # in vtp when it was asked
    keep, judge = still_plain([before, after, late], {"owner": 10_500}, {}, [])
    assert [p.upload_id for p in keep] == ["b"]
    assert [m.offset() for m in judge] == [1, 3]
    assert still_plain([before], {"another owner": 30_000}, {}, [])[0] == [before]


def test_a_stored_copy_of_another_message_or_a_second_copy_in_the_batch_is_judged():
    this = plain("a", 1)
    same = {"a": this.here}  # a replay of this very batch: still plain
    assert still_plain([this], {}, same, [])[0] == [this]
    other = {"a": ("vtp.eu.uploads:0:99", "vtp.eu.validated", 0, 7)}
    assert still_plain([this], {}, other, [])[0] == []
    # the same upload id in another message of the batch, plain or judged
    assert still_plain([this, plain("a", 2)], {}, {}, [])[0] == []
    assert still_plain([this], {}, {}, [judged("a", 5)])[0] == []
    assert still_plain([this], {}, {}, [judged("b", 5)])[0] == [this]


def facts(**columns) -> pa.Table:
    row = {"position": 0, "vin": VIN, "upload_id": "a", "sample_count": 3, "first_ms": 10_000}
    return pa.table({k: [v] for k, v in {**row, "text_ok": True, "min_seq": 0, **columns}.items()})


def test_the_facts_must_be_one_row_per_message_in_order():
    messages = [Message(key=VIN.encode()), Message(key=VIN.encode())]
    two = pa.concat_tables([facts(), facts(position=1)])
    assert facts_match(two, messages)
    assert not facts_match(facts(), messages)
    assert not facts_match(pa.concat_tables([facts(position=1), facts()]), messages)


@pytest.mark.parametrize(
    "odd",
    [
        {"vin": "WVW4FL3J3TB579290"},  # keyed by another VIN than the body holds
        {"text_ok": False, "vin": ""},  # text that is not UTF-8 (the facts blank it)
        {"min_seq": -1},
        {"sample_count": 0},
    ],
)
def test_an_upload_the_facts_find_odd_is_judged_in_python(odd):
    owner = registration(Period(0, "owner", "eu"))
    message = Message(topic="vtp.eu.validated", partition=0, offset=0, key=VIN.encode())
    assert len(plain_candidates([message], facts(), {VIN: owner}, "eu")[0]) == 1
    assert plain_candidates([message], facts(**odd), {VIN: owner}, "eu") == ([], [message])


def test_each_upload_schema_reads_as_a_clickhouse_structure():
    assert structure(NEWEST) == STRUCTURE
    assert STRUCTURE.startswith("vin String, upload_id String, sent_at_ms Int64, ")
    assert "gear Nullable(String)" in STRUCTURE and "dtcs Array(String)" in STRUCTURE
    v1 = structure(default_store().get("VehicleUpload", 1))
    assert "cabin_temperature" in STRUCTURE and "cabin_temperature" not in v1


@pytest.mark.parametrize(
    "avro",
    [["null", "string", "long"], {"type": "map", "values": "long"}, "bytes", ["string"]],
)
def test_an_avro_type_the_structure_does_not_know_is_refused_not_guessed(avro):
    with pytest.raises(ValueError, match="no ClickHouse type"):
        clickhouse_type(avro)

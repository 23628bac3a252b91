"""The export stream accounts for what it handed out, to the end or not."""

import io
import random
import zipfile

import pytest

from owner_api.export import stream_export


def text_pages(n_pages: int, fail_at: int | None = None):
    def pages():
        for i in range(n_pages):
            if i == fail_at:
                raise OSError("warehouse went away")
            noise = random.Random(i).randbytes(20_000).hex().encode()  # does not compress away
            yield b'{"row": "%s"}\n' % noise * 10, 10

    return pages


def run(tables, take: int | None = None):
    ended: list = []
    stream = stream_export(
        "o", "eu", "jsonl", tables, "now", lambda c, e: ended.append((dict(c), e))
    )
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if take is not None and len(chunks) >= take:
            stream.close()  # the client went away
            break
    return b"".join(chunks), ended


def test_a_whole_export_ends_with_its_manifest_and_its_counts():
    data, ended = run([("samples", text_pages(3)), ("trips", text_pages(1))])
    assert ended == [({"samples": 30, "trips": 10}, None)]
    assert b"manifest.json" in data and zipfile.ZipFile(io.BytesIO(data)).testzip() is None


def test_a_client_that_goes_away_leaves_what_it_was_sent_on_record():
    _, ended = run([("samples", text_pages(50))], take=3)
    ((counts, why),) = ended
    assert why == "the client went away before the end" and 0 < counts["samples"] < 500


def test_a_warehouse_failing_midway_is_on_record_and_raised():
    with pytest.raises(OSError, match="warehouse went away"):
        run([("samples", text_pages(5, fail_at=2)), ("trips", text_pages(1))])


def test_the_failure_names_what_was_sent_before_it():
    ended: list = []
    stream = stream_export(
        "o",
        "eu",
        "jsonl",
        [("samples", text_pages(5, fail_at=2))],
        "now",
        lambda c, e: ended.append((dict(c), e)),
    )
    with pytest.raises(OSError, match="warehouse went away"):
        list(stream)
    assert ended == [({"samples": 20}, "failed: OSError: warehouse went away")]


def test_parquet_is_stored_as_it_is_and_text_is_deflated():
    """Parquet is compressed inside already; deflating it again cost more than a third of
    an export's time for 8 % less size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"n": list(range(50_000))})
    parquet = b"".join(
        stream_export(
            "o", "eu", "parquet", [("samples", lambda: iter([table]))], "now", lambda c, e: None
        )
    )
    archive = zipfile.ZipFile(io.BytesIO(parquet))
    assert archive.testzip() is None
    assert archive.getinfo("samples.parquet").compress_type == zipfile.ZIP_STORED
    assert pq.read_table(io.BytesIO(archive.read("samples.parquet"))).equals(table)
    text, _ = run([("samples", text_pages(1))])
    member = zipfile.ZipFile(io.BytesIO(text)).getinfo("samples.jsonl")
    assert member.compress_type == zipfile.ZIP_DEFLATED
    assert member.compress_size < member.file_size

"""Everything an owner has, as one streamed ZIP: a file per table plus manifest.json.

The ZIP is written to a pipe that the HTTP response drains after every page of rows,
so memory stays at about one page whatever the owner's size. The manifest comes last,
with the rows actually written per table, so the owner can check completeness.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import IO, Any

import pyarrow.parquet as pq
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Send

# Parquet files are compressed already (zstd): deflating them again took 1.7 s of a
# 1.3M-sample export for 8 % less size, so they are stored. Text is deflated at level 1:
# 2.9x faster than the default level 6 on JSONL, for 18 % more bytes.
ZIP_COMPRESSION: dict[str, dict[str, Any]] = {
    "parquet": {"compression": zipfile.ZIP_STORED},
    "jsonl": {"compression": zipfile.ZIP_DEFLATED, "compresslevel": 1},
    "csv": {"compression": zipfile.ZIP_DEFLATED, "compresslevel": 1},
}


class _Pipe(io.RawIOBase):
    """A write-only stream that hands out what was written since the last take()."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    # io's write takes any buffer; zipfile writes bytes here.
    def write(self, b: bytes) -> int:  # type: ignore[override]  # narrower than io's buffer
        self._chunks.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


class _Counted(io.RawIOBase):
    """A ZIP member seen as a file with a position (pyarrow's writer asks for it)."""

    def __init__(self, member: IO[bytes]) -> None:
        self._member = member
        self._pos = 0

    def writable(self) -> bool:
        return True

    # io's write takes any buffer; pyarrow's writer writes bytes here.
    def write(self, b: bytes) -> int:  # type: ignore[override]  # narrower than io's buffer
        self._member.write(b)
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos


def _write_pages(
    member: IO[bytes],
    fmt: str,
    pages: Iterator[Any],
    pipe: _Pipe,
    counts: dict[str, int],
    name: str,
) -> Generator[bytes, None, None]:
    """Write the pages into the member, yielding the ZIP bytes after each; ``counts[name]``
    holds the rows handed out so far.

    Parquet pages are Arrow tables; text pages come formatted by ClickHouse, as
    (bytes, rows)."""
    counts[name] = 0
    parquet: pq.ParquetWriter | None = None
    try:
        for page in pages:
            if fmt == "parquet":
                if parquet is None:
                    parquet = pq.ParquetWriter(_Counted(member), page.schema, compression="zstd")
                parquet.write_table(page)
                rows = page.num_rows
            else:
                data, rows = page
                member.write(data)
            chunk = pipe.take()
            if chunk:
                yield chunk
            counts[name] += rows
    finally:
        if parquet is not None:
            parquet.close()


class ClosingStream(StreamingResponse):
    """A streamed response that closes its source as soon as the stream ends, however it
    ends: a client that goes away cancels the stream, and the export's own ending (its
    access-log row) then runs at once, not whenever the garbage collector finds it."""

    def __init__(self, source: Generator[bytes, None, None], **options: Any) -> None:
        self._source = source
        super().__init__(source, **options)

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await run_in_threadpool(_close_when_idle, self._source)


def _close_when_idle(source: Generator[bytes, None, None]) -> None:
    """close() a generator; a cancelled stream may still be inside its next() in a worker
    thread for a moment ("generator already executing")."""
    for _ in range(600):
        try:
            source.close()
            return
        except ValueError:
            time.sleep(0.05)


def stream_export(
    owner_id: str,
    region: str,
    fmt: str,
    tables: Sequence[tuple[str, Callable[[], Iterator[Any]]]],
    generated_at: str,
    done: Callable[[dict[str, int], str | None], None],
) -> Generator[bytes, None, None]:
    """Yield the ZIP's bytes. ``done`` gets the row counts handed out and, when the export
    did not reach its manifest (the client went away, the warehouse failed), what
    happened: a partial export is accounted for too."""
    pipe = _Pipe()
    counts: dict[str, int] = {}
    ended: str | None = "the client went away before the end"
    try:
        with zipfile.ZipFile(pipe, "w", **ZIP_COMPRESSION[fmt]) as archive:
            for name, pages in tables:
                with archive.open(f"{name}.{fmt}", "w", force_zip64=True) as member:
                    yield from _write_pages(member, fmt, pages(), pipe, counts, name)
                yield pipe.take()
            manifest = {
                "owner_id": owner_id,
                "region": region,
                "format": fmt,
                "generated_at": generated_at,
                "row_counts": counts,
                "files": [f"{name}.{fmt}" for name, _ in tables],
            }
            archive.writestr("manifest.json", json.dumps(manifest, indent=2))
        yield pipe.take()
        ended = None
    except GeneratorExit:
        raise
    except Exception as exc:
        ended = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise
    finally:
        done(counts, ended)

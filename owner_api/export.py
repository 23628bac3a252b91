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
from collections.abc import Callable, Generator, Iterator

import pyarrow.parquet as pq


class _Pipe(io.RawIOBase):
    """A write-only stream that hands out what was written since the last take()."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self._chunks.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


class _Counted(io.RawIOBase):
    """A ZIP member seen as a file with a position (pyarrow's writer asks for it)."""

    def __init__(self, member) -> None:
        self._member = member
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self._member.write(b)
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos


def _write_pages(member, fmt: str, pages: Iterator, pipe: _Pipe) -> Generator[bytes, None, int]:
    """Write the pages into the member, yielding the ZIP bytes after each; rows written.

    Parquet pages are Arrow tables; text pages come formatted by ClickHouse, as
    (bytes, rows)."""
    written = 0
    parquet: pq.ParquetWriter | None = None
    try:
        for page in pages:
            if fmt == "parquet":
                if parquet is None:
                    parquet = pq.ParquetWriter(_Counted(member), page.schema, compression="zstd")
                parquet.write_table(page)
                written += page.num_rows
            else:
                data, rows = page
                member.write(data)
                written += rows
            chunk = pipe.take()
            if chunk:
                yield chunk
    finally:
        if parquet is not None:
            parquet.close()
    return written


def stream_export(
    owner_id: str,
    region: str,
    fmt: str,
    tables: list[tuple[str, Callable[[], Iterator]]],
    generated_at: str,
    done: Callable[[dict[str, int]], None],
) -> Iterator[bytes]:
    """Yield the ZIP's bytes; ``done`` gets the row counts once the manifest is out."""
    pipe = _Pipe()
    counts: dict[str, int] = {}
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, pages in tables:
            entry = zipfile.ZipInfo(f"{name}.{fmt}", time.gmtime()[:6])
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as member:
                counts[name] = yield from _write_pages(member, fmt, pages(), pipe)
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
    done(counts)

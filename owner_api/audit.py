"""The access log, written in groups: each request waits until its own row is stored (an
answer is never sent without its row in the log), but one INSERT carries every row that
is waiting, not one part per request.

The writer thread takes whatever has queued while the previous INSERT ran, so under load
rows go in batches and alone they go at once; there is no timer to wait for.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa

from vtp.core.warehouse import Warehouse

log = logging.getLogger("vtp.owner_api")

SCHEMA = pa.schema(
    [
        ("owner_id", pa.string()),
        ("at", pa.timestamp("ms", tz="UTC")),
        ("request_id", pa.string()),
        ("actor", pa.string()),
        ("grant_id", pa.string()),
        ("action", pa.string()),
        ("resource", pa.string()),
        ("detail", pa.string()),
        ("rows", pa.uint64()),
        ("status", pa.uint16()),
    ]
)


@dataclass(frozen=True)
class AuditEntry:
    owner_id: str
    request_id: str
    actor: str
    grant_id: str
    action: str
    resource: str
    detail: str
    rows: int
    status: int


@dataclass
class _Waiting:
    row: dict[str, object]
    stored: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class AuditLog:
    def __init__(self, warehouse: Warehouse):
        self._warehouse = warehouse
        self._queue: list[_Waiting] = []
        self._cond = threading.Condition()
        self.inserts = 0  # INSERT statements so far (rows per insert is what batching buys)
        threading.Thread(target=self._write_forever, name="audit-log", daemon=True).start()

    def record(self, entry: AuditEntry) -> None:
        """Store ``entry``; returns once it is in the warehouse, raises if it is not."""
        waiting = _Waiting(
            {
                "owner_id": entry.owner_id,
                "at": int(time.time() * 1000),
                "request_id": entry.request_id,
                "actor": entry.actor,
                "grant_id": entry.grant_id,
                "action": entry.action,
                "resource": entry.resource,
                "detail": entry.detail[:2000],
                "rows": entry.rows,
                "status": entry.status,
            }
        )
        with self._cond:
            self._queue.append(waiting)
            self._cond.notify()
        waiting.stored.wait()
        if waiting.error is not None:
            raise waiting.error

    def _write_forever(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                group, self._queue = self._queue, []
            error: Exception | None = None
            try:
                self._warehouse.insert_arrow(
                    "audit_log", pa.Table.from_pylist([w.row for w in group], schema=SCHEMA)
                )
                self.inserts += 1
            except Exception as exc:  # every waiting request learns it, and fails
                log.exception("access log: %d rows not stored", len(group))
                error = exc
            for waiting in group:
                waiting.error = error
                waiting.stored.set()

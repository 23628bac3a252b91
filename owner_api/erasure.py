"""Erasures run as jobs.

A request records the erasure and is answered at once (202): from that moment its time is
the horizon the sink honours, so nothing about the owner's past is stored again. A worker
thread then deletes the owner's rows in every owner table (``ALTER TABLE … DELETE``, parts
rewritten), under the sink's write lock so no batch filtered before the erasure lands
after its deletes, and records the completion and the rows deleted. Erasures still
pending when `vtp serve` stopped (or died) are taken up when it starts again: the deletes
are idempotent. A job starts within a second of its request (or of the service's start);
how long it runs depends on the owner's rows (README, "Measured here").

Before it is marked completed, a job also tells the region's worker (one control message
per vehicle of the owner, ``owner_api.worker_notice``), so the worker's session state
forgets the owner too; while Kafka cannot take the notice, the job stays pending and is
tried again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from owner_api import store
from owner_api.worker_notice import WorkerNotice
from vtp.core import metrics
from vtp.core.warehouse import Warehouse

log = logging.getLogger("vtp.owner_api")


class ErasureJobs:
    def __init__(
        self,
        warehouse: Warehouse,
        write_lock: Callable[[], contextlib.AbstractContextManager[object]],
        done: Callable[[str, str, dict[str, int]], None],
        notice: WorkerNotice | None,
        region: str,
        cluster: str = "",
    ):
        self._warehouse, self._write_lock, self._done = warehouse, write_lock, done
        self._cluster = cluster  # VTP_WAREHOUSE_CLUSTER: where the deletes run
        self._notice = notice
        self._region = region
        # When the oldest erasure not completed yet was requested (ms), as last read.
        self._oldest_pending_ms: int | None = None
        metrics.ERASURE_OLDEST_PENDING_SECONDS.labels(region).set_function(self._oldest_age_s)
        # An erasure's vehicles, found before its deletes and kept until the worker has
        # been told (a retry after the deletes would no longer find them in the warehouse).
        self._vins: dict[str, set[str]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.completed = 0
        self._thread = threading.Thread(target=self._run, name="erasures", daemon=True)
        self._thread.start()

    def submit(self, owner: str) -> str:
        """Record an erasure of ``owner``; it is honoured from now, done soon after."""
        erasure_id, _ = store.record_erasure(self._warehouse, owner)
        self._wake.set()
        return erasure_id

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                pending = store.pending_erasures(self._warehouse)
                self._pending(pending)
                for owner, erasure_id, requested_ms in pending:
                    if self._stopping.is_set():
                        return
                    self._erase(owner, erasure_id, requested_ms)
                self._pending([])
            except Exception:  # the warehouse failed: the erasure stays pending, tried again
                log.exception("erasures: a job failed; trying again in 5 s")
                self._stopping.wait(5)
                continue
            self._wake.wait(1.0)
            self._wake.clear()

    def _pending(self, pending: list[tuple[str, str, int]]) -> None:
        metrics.ERASURES_PENDING.labels(self._region).set(len(pending))
        self._oldest_pending_ms = min((p[2] for p in pending), default=None)

    def _oldest_age_s(self) -> float:
        oldest = self._oldest_pending_ms
        return 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)

    def _erase(self, owner: str, erasure_id: str, requested_ms: int) -> None:
        started = time.perf_counter()
        if erasure_id not in self._vins:
            self._vins[erasure_id] = store.owner_vins(self._warehouse, owner)
        with self._write_lock():  # no sink batch in flight while the owner's rows go
            deleted = store.erase_owner(self._warehouse, owner, self._cluster)
        if self._notice is not None:
            vins = self._vins[erasure_id] | self._notice.registry_vehicles(owner)
            told = self._notice.send(owner, requested_ms, vins)
            log.info("erasure %s: the worker told about %d vehicles", erasure_id, told)
        store.complete_erasure(self._warehouse, owner, erasure_id, requested_ms, deleted)
        self._vins.pop(erasure_id, None)
        self.completed += 1
        metrics.ERASURES_COMPLETED.labels(self._region).inc()
        took = time.perf_counter() - started
        log.info("erasure %s of owner %s done in %.1f s: %s", erasure_id, owner, took, deleted)
        self._done(owner, erasure_id, deleted)

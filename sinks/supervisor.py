"""The region's sink, started again whenever it fails, so the process that also serves the
owner API keeps serving reads (and exports and erasures) while the sink recovers.

A failed sink stops without committing (sinks/sink.py), so a new one starts from the last
committed batch: nothing is lost or stored twice. The pause before a new start doubles
from 1 s up to a minute, and falls back to 1 s after a run that lasted a minute.
``health()`` is what /healthz and the vtp_sink_up gauge say.
"""

from __future__ import annotations

import logging
import threading
import time

from sinks.sink import RegionSink
from vtp.core import metrics
from vtp.core.settings import Settings
from vtp.core.warehouse import Warehouse

log = logging.getLogger("vtp.sink")


class SinkSupervisor:
    def __init__(self, settings: Settings, warehouse: Warehouse, write_lock: threading.RLock):
        self.settings, self.warehouse, self.write_lock = settings, warehouse, write_lock
        self.region = settings.need_region()
        self._stopping = threading.Event()
        self._sink: RegionSink | None = None
        self.state, self.error, self.restarts = "starting", "", 0

    def run(self) -> None:
        pause = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self._sink = RegionSink(self.settings, self.warehouse, self.write_lock)
                self._set("running", "")
                self._sink.run(should_stop=self._stopping.is_set)
            except Exception as exc:
                self._set("restarting", f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
                log.exception("sink %s failed; starting it again in %.0f s", self.region, pause)
                if time.monotonic() - started >= 60:
                    pause = 1.0
                if self._stopping.wait(pause):
                    break
                pause = min(60.0, pause * 2)
                self.restarts += 1
                metrics.SINK_RESTARTS.labels(self.region).inc()
        self._set("stopped", self.error)

    def stop(self) -> None:
        self._stopping.set()
        if self._sink is not None:
            self._sink.stop()

    def health(self) -> dict[str, str | int]:
        return {"state": self.state, "error": self.error, "restarts": self.restarts}

    def _set(self, state: str, error: str) -> None:
        self.state, self.error = state, error
        metrics.SINK_UP.labels(self.region).set(1 if state == "running" else 0)

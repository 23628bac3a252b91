"""`vtp serve --region R`: the owner API, in the process that owns the region's warehouse.

chdb lets one process open a warehouse folder, so in embedded mode this process runs
the region's sink as well (in a thread) and both share the one engine, a statement at
a time. An erasure takes the sink's write lock, so no batch filtered before it lands
after its deletes. With a ClickHouse server (VTP_WAREHOUSE=http...), `--no-sink` runs
the API alone next to separate `vtp sink` processes.

The listening address goes to <data_dir>/<region>/serve.json once the socket is bound
(VTP_API_PORT=0 picks a free port).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Protocol

import uvicorn

from owner_api.app import create_app
from sinks.migrations import MigrationOptions, migrate
from sinks.supervisor import SinkSupervisor
from vtp.core import metrics
from vtp.core.keys import KeyFolder
from vtp.core.listen import listening_socket
from vtp.core.settings import Settings
from vtp.core.warehouse import open_warehouse

log = logging.getLogger("vtp.serve")


def address_file(settings: Settings) -> Path:
    return settings.home / "serve.json"


class ServeError(RuntimeError):
    """`vtp serve` cannot start."""


def _bind(host: str, port: int) -> socket.socket:
    try:
        return listening_socket(host, port, port_setting="VTP_API_PORT", backlog=128)
    except OSError as exc:
        raise ServeError(exc.strerror) from None


def run_serve(settings: Settings, with_sink: bool = True) -> int:
    region = settings.need_region()
    keys = KeyFolder(settings)
    sock = _bind(settings.api_host, settings.api_port)
    try:
        warehouse = open_warehouse(settings)
    except BaseException:
        sock.close()
        raise
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    migrate(warehouse, options=MigrationOptions.from_settings(settings))
    write_lock = threading.RLock()
    sink = SinkSupervisor(settings, warehouse, write_lock) if with_sink else None
    erasure_lock = (lambda: write_lock) if sink else contextlib.nullcontext
    app = create_app(
        settings, warehouse, keys, erasure_lock, sink.health if sink else lambda: {"state": "off"}
    )
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=False))
    # The API keeps serving while the sink restarts after a failure (sinks/supervisor.py).
    thread = threading.Thread(target=sink.run, name=f"sink-{region}") if sink else None
    if thread:
        thread.start()
    where = address_file(settings)
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(json.dumps({"url": f"http://{host}:{port}", "pid": os.getpid()}))
    log.info("owner API for %s on http://%s:%s (sink: %s)", region, host, port, bool(sink))
    # uvicorn re-raises the signal that stopped it once it has shut down; with the
    # default handler that would end the process before the sink flushes. A handler of
    # our own makes that re-raise a no-op, and the cleanup below runs.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        where.unlink(missing_ok=True)
        app.state.erasure_jobs.stop()  # an erasure under way ends first (or stays pending)
        if sink and thread:
            sink.stop()
            thread.join(60)
        warehouse.close()
    return 0


class Started(Protocol):
    """What waiting for a service needs of its process: a vtp.harness.Process (named
    structurally, as the harness imports this module)."""

    def exited(self) -> int | None: ...

    def log_tail(self, lines: int = ...) -> str: ...


def wait_for_service(settings: Settings, process: Started, timeout: float = 60.0) -> str:
    """The URL of a `vtp serve` process (vtp.harness.Process) once it answers."""
    import time

    import httpx

    region = settings.need_region()
    deadline = time.monotonic() + timeout
    path = address_file(settings)
    while time.monotonic() < deadline:
        if process.exited() is not None:
            raise ServeError(f"vtp serve --region {region} exited:\n{process.log_tail()}")
        if path.exists():
            url: str = json.loads(path.read_text())["url"]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise ServeError(f"vtp serve --region {region} did not answer within {timeout:.0f} s")

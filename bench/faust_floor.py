"""What Faust's per-event path costs on its own: an agent that takes the raw uploads as
the worker does (``take_events`` of up to 1000, the worker's app settings and fixes) and
does nothing with them.

``python -m bench.faust_floor UPLOADS OUT`` (the settings from ``VTP_*``, as ``vtp
worker``): reads the region's uploads topic from its beginning under a group of its own
until it has taken ``UPLOADS`` events, then writes ``{"events": …, "cpu_s": …,
"steady_cpu_s": …}`` to the file ``OUT`` (CPU of the whole process, and from its first
batch to its last; Faust's worker takes over stdout) and exits. ``bench.throughput`` runs it on each region's backlog.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faust

from stream_jobs import faust_fixes
from stream_jobs.aggregate import RAW_TOPIC
from stream_jobs.app import BATCH_MAX, BATCH_WITHIN_S
from vtp.core.settings import load_settings


def main() -> None:
    expected, out = int(sys.argv[1]), Path(sys.argv[2])
    settings = load_settings()
    faust_fixes.install()
    app = faust.App(
        f"bench-faust-floor-{time.time_ns()}",
        broker=f"kafka://{settings.bootstrap()}",
        store="memory://",
        consumer_auto_offset_reset="earliest",
        topic_allow_declare=False,
        web_enabled=False,
        datadir=tempfile.mkdtemp(prefix="vtp-faust-floor-"),
    )
    uploads = app.topic(settings.topics.uploads, **RAW_TOPIC)
    seen = {"events": 0, "first_cpu": 0.0}

    @app.agent(uploads)
    async def take(stream: faust.Stream[Any]) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            if not seen["events"]:
                seen["first_cpu"] = time.process_time()
            seen["events"] += len(events)
            if seen["events"] >= expected:
                cpu = time.process_time()
                out.write_text(
                    json.dumps(
                        {
                            "events": seen["events"],
                            "cpu_s": cpu,
                            "steady_cpu_s": cpu - seen["first_cpu"],
                        }
                    )
                )
                os._exit(0)  # nothing to commit or close: the group is thrown away

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()

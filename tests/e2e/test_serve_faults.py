"""`vtp serve` keeps serving owners while its sink fails and starts again, and says so."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from owner_api.tokens import issue, owner_claims
from producers.publish import publish_fleet, register_fleet
from producers.simulator import build_fleet
from vtp.core.keys import load_keyring
from vtp.core.topics import create_topics
from vtp.harness import start_serve, start_worker, wait_drained
from vtp.serve import wait_for_service

pytestmark = pytest.mark.e2e


def _health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=10).json()


def test_the_api_serves_while_the_sink_cannot_run_and_the_sink_recovers(base_settings, tmp_path):
    from tests.e2e.test_pipeline import free_port, scrape

    settings = base_settings.with_(
        region="eu",
        data_dir=tmp_path,
        topic_prefix=f"heal-{uuid.uuid4().hex[:6]}",
        sink_batch_messages=50,
        sink_flush_ms=300,
    )
    ring = load_keyring(settings)
    port = free_port()
    serve = start_serve(settings, port)  # the region's topics do not exist yet
    worker = None
    try:
        url = wait_for_service(settings, serve)
        deadline = time.monotonic() + 60
        while _health(url)["sink"]["state"] != "restarting" and time.monotonic() < deadline:
            time.sleep(0.2)
        health = _health(url)
        assert health["status"] == "degraded" and "does not exist" in health["sink"]["error"]
        fleet = [v for v in build_fleet(43, owners=4, vehicles=6) if v.region == "eu"]
        token = issue(ring, owner_claims(fleet[0].owner_id, "eu", 600))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
            r = api.get("/v1/vehicles")  # answered, while the sink is down
            assert (r.status_code, r.json()["error"]) == (404, "unknown_owner")

            create_topics(settings)
            register_fleet(settings, fleet)
            worker = start_worker(settings)
            published = publish_fleet(settings, fleet, seed=43, duration_s=300)
            assert published.report.ok
            assert wait_drained(settings, [serve, worker], timeout=180)
            health = _health(url)
            assert (health["status"], health["sink"]["state"]) == ("ok", "running")
            assert health["sink"]["restarts"] >= 1
            vehicles = api.get("/v1/vehicles").json()["vehicles"]
        mine = [v for v in fleet if v.owner_id == fleet[0].owner_id]
        assert sorted(v["vin"] for v in vehicles) == sorted(v.vin for v in mine)
        assert sum(v["samples"] for v in vehicles) == sum(
            published.truth.vehicles[v.vin].samples for v in mine
        )
        metrics = scrape(port)
        assert metrics['vtp_sink_restarts_total{region="eu"}'] >= 1
        assert metrics['vtp_sink_up{region="eu"}'] == 1
    finally:
        for p in (serve, worker):
            if p is not None:
                p.stop()

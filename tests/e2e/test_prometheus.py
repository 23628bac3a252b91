"""The real Prometheus server scrapes a running region with vtp's own config and rules,
and answers over HTTP what the processes report; every process's /metrics passes
`promtool check metrics`."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from deploy.tools import tool
from producers.publish import publish_fleet, register_fleet
from producers.simulator import build_fleet
from tests.e2e.test_pipeline import free_port, scrape
from vtp.harness import start_serve, start_worker, wait_drained
from vtp.serve import wait_for_service

pytestmark = [pytest.mark.e2e, pytest.mark.deploy]

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _config_for(ports: dict[str, int], into: Path) -> Path:
    """deploy/prometheus/prometheus.yml with its targets on loopback, scraped every second
    (no Alertmanager here: the alerts are read from Prometheus itself). The embedded
    warehouse has `vtp serve` run the sink in its own process: no vtp-sink job; the fleet
    publishes to Kafka directly: no vtp-gateway job."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS / f) for f in config["rule_files"]]
    del config["alerting"]
    config["scrape_configs"] = [
        j for j in config["scrape_configs"] if j["job_name"] not in ("vtp-sink", "vtp-gateway")
    ]
    for job in config["scrape_configs"]:
        process = job["job_name"].removeprefix("vtp-")
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{ports[process]}"]
    path = into / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _api(port: int, path: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}{query}", timeout=10) as r:
        answer = json.load(r)
    assert answer["status"] == "success", answer
    return answer["data"]


def _value(port: int, promql: str) -> float | None:
    result = _api(port, "query", query=promql)["result"]
    return float(result[0]["value"][1]) if result else None


def _until(what, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_prometheus_scrapes_a_region_and_answers_the_counts_it_reports(region_stack, tmp_path):
    settings = region_stack("eu", "prom", sink_batch_messages=200, sink_flush_ms=300)
    fleet = build_fleet(81, owners=2, vehicles=3, regions=("eu",))
    register_fleet(settings, fleet)
    ports = {name: free_port() for name in ("worker", "serve", "prometheus")}
    processes = [start_worker(settings, ports["worker"]), start_serve(settings, ports["serve"])]
    log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        [
            str(tool("prometheus")),
            f"--config.file={_config_for(ports, tmp_path)}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_service(settings, processes[1])
        # scraped before any upload, so Prometheus sees the counters rise
        up = 'sum(up{region="eu", job=~"vtp-.*"})'
        assert _until(lambda: _value(ports["prometheus"], up) == 2), _value(ports["prometheus"], up)
        published = publish_fleet(settings, fleet, seed=81, duration_s=1800)
        assert published.report.ok
        assert wait_drained(settings, processes, timeout=300)

        # every process's exposition is one promtool accepts
        for name in ("worker", "serve"):
            text = urllib.request.urlopen(f"http://127.0.0.1:{ports[name]}/metrics").read()
            checked = subprocess.run(
                [str(tool("promtool")), "check", "metrics"],
                input=text,
                capture_output=True,
                timeout=60,
            )
            assert checked.returncode == 0, (name, checked.stdout, checked.stderr)

        # Prometheus, queried over HTTP, answers what the processes themselves report
        stored = scrape(ports["serve"])['vtp_sink_uploads_stored_total{region="eu"}']
        assert stored == published.uploads
        queries = {
            'sum(vtp_sink_uploads_stored_total{region="eu"})': stored,
            'sum(vtp_uploads_in_total{region="eu", job="vtp-worker"})': published.uploads,
            'sum(up{region="eu", job=~"vtp-.*"})': 2,
        }
        for promql, expected in queries.items():
            got = _until(lambda q=promql, e=expected: _value(ports["prometheus"], q) == e)
            assert got, (promql, _value(ports["prometheus"], promql), expected)

        # vtp's rules are loaded and evaluate without error, and a healthy region fires none
        def evaluated() -> list[dict]:
            groups = _api(ports["prometheus"], "rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return rules if rules and all("lastEvaluation" in r for r in rules) else []

        rules = _until(evaluated)
        assert {r["name"] for r in rules} >= {"VtpNoSamplesStored", "region:vtp_uploads_in:rate5m"}
        assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
        assert _until(
            lambda: _value(ports["prometheus"], 'region:vtp_uploads_in:rate5m{region="eu"}')
        )
        firing = [
            a for a in _api(ports["prometheus"], "alerts")["alerts"] if a["state"] == "firing"
        ]
        assert firing == []
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        log.close()
        for p in processes:
            p.stop()

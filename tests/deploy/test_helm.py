"""The Helm chart (deploy/helm/vtp), rendered for both regions' example values and
checked by the tools operators use: `helm lint --strict` (values.schema.json),
kubeconform against Kubernetes' and Strimzi's own schemas, kube-score. Then what those
tools cannot know: the topics match `vtp topics --plan`, egress is an allow-list, every
VTP_* variable is a setting vtp accepts, and secrets reach only the processes that use
them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from deploy.k8s_schemas import fetch_schemas, schema_locations
from deploy.tools import tool
from producers.gateway import Gateway
from producers.pki import RegionPKI
from stream_jobs.kafka_security import worker_credentials
from vtp.core.regions import REGIONS
from vtp.core.settings import documented_settings, load_settings
from vtp.core.topics import topic_plan

pytestmark = pytest.mark.deploy

HELM = Path(__file__).resolve().parents[2] / "deploy" / "helm"
CHART = HELM / "vtp"
KUBERNETES = "1.31.0"


def _run(
    name: str, *args: str | Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool(name)), *map(str, args)], input=stdin, capture_output=True, text=True, timeout=300
    )


def _helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return _run("helm", *args)


def _render(region: str, *extra: str) -> str:
    done = _helm(
        "template", f"vtp-{region}", CHART, "-f", HELM / f"values-{region}.yaml",
        "--kube-version", KUBERNETES, "--namespace", f"vtp-{region}", *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _manifests(region: str) -> list[dict[str, Any]]:
    return [m for m in yaml.safe_load_all(_render(region)) if m]


def _kubeconform(manifests: str) -> subprocess.CompletedProcess[str]:
    locations = [
        a
        for loc in schema_locations(fetch_schemas(load_settings()))
        for a in ("-schema-location", loc)
    ]
    return _run("kubeconform", "-strict", "-summary", *locations, "-", stdin=manifests)


@pytest.mark.parametrize("region", REGIONS)
def test_the_chart_lints_strictly_with_each_regions_values(region):
    done = _helm(
        "lint",
        "--strict",
        CHART,
        "-f",
        HELM / f"values-{region}.yaml",
        "--kube-version",
        KUBERNETES,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        (["--set", "region=us"], "value must be one of 'cn', 'eu'"),
        (["--set", "image.tag=latest"], "/image/tag"),
        (["--set", "topics.replication=0"], "/topics/replication"),
        (["--set", "worker.env.KAFKA_DEBUG=all"], "'KAFKA_DEBUG' does not match"),  # VTP_* only
        (["--set", "unknown=1"], "additional properties 'unknown' not allowed"),
        (["--set", "kafka.egress.cidrs=null"], "missing property 'cidrs'"),  # eu: no Strimzi
        (["--set", "clickhouse.cluster=eu-1"], "/clickhouse/cluster"),  # written into SQL
    ],
)
def test_values_outside_the_schema_are_refused_with_the_path_that_is_wrong(values, refusal):
    done = _helm(
        "template", "x", CHART, "-f", HELM / "values-eu.yaml", "--kube-version", KUBERNETES, *values
    )
    assert done.returncode != 0 and refusal in done.stderr, done.stderr


def test_the_chart_without_a_region_does_not_render():
    done = _helm("lint", "--strict", CHART, "--kube-version", KUBERNETES)
    assert done.returncode != 0 and "/region" in done.stdout + done.stderr


@pytest.mark.parametrize("region", REGIONS)
def test_the_manifests_are_valid_kubernetes_and_strimzi_resources(region):
    done = _kubeconform(_render(region))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Invalid: 0, Errors: 0, Skipped: 0" in done.stdout, done.stdout


def test_kubeconform_refuses_a_misspelt_field_of_either_kind():
    """The check can fail: a field Strimzi does not know, and one Kubernetes does not."""
    for wrong in (
        _render("cn").replace("  topicName:", "  topicNme:", 1),
        _render("cn").replace("  revisionHistoryLimit:", "  revisionHistoryLimt:", 1),
    ):
        done = _kubeconform(wrong)
        assert done.returncode != 0 and "additional properties" in done.stdout, done.stdout


@pytest.mark.parametrize("region", REGIONS)
def test_kube_score_finds_nothing_to_fix(region):
    done = _run(
        "kube-score", "score", "-", "--output-format", "ci",
        "--enable-optional-test", "container-seccomp-profile",
        "--enable-optional-test", "container-ports-check",
        stdin=_render(region),
    )  # fmt: skip
    problems = [
        line for line in done.stdout.splitlines() if line.startswith(("[CRITICAL]", "[WARNING]"))
    ]
    assert done.returncode == 0 and not problems, "\n".join(problems) or done.stderr
    assert "[OK] vtp-" + region + "-worker" in done.stdout


def _settings_of(values: dict[str, Any]):
    t = values["topics"]
    return load_settings(
        {
            "VTP_REGION": values["region"],
            "VTP_TOPIC_PREFIX": t["prefix"],
            "VTP_TOPIC_PARTITIONS": str(t["partitions"]),
            "VTP_TOPIC_REPLICATION": str(t["replication"]),
            "VTP_TOPIC_MIN_INSYNC": str(t["minInsync"]),
            "VTP_CHANGELOG_COMPACTION_LAG_S": str(t["changelogCompactionLagSeconds"]),
        }
    )


def test_the_kafka_topics_are_the_ones_vtp_topics_and_the_worker_create():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values.update(region="cn")
    declared = {
        m["spec"]["topicName"]: (
            m["spec"]["partitions"],
            m["spec"]["replicas"],
            m["spec"].get("config", {}),
        )
        for m in _manifests("cn")
        if m["kind"] == "KafkaTopic"
    }
    planned = {
        t.name: (t.partitions, t.replicas, t.config) for t in topic_plan(_settings_of(values))
    }
    assert declared == planned


def _containers(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m["spec"]["template"]["spec"]
        for m in manifests
        if m["kind"] in ("Deployment", "Job")
    }


@pytest.mark.parametrize("region", REGIONS)
def test_every_variable_the_pods_get_is_a_setting_vtp_accepts(region, tmp_path):
    """As the pod would see it: its mounted files made here (a CA, the SASL password),
    then vtp's own settings and the worker's Kafka credentials made from them."""
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    (tmp_path / "password").write_text('pa"ss\\word with spaces\n')  # JSON would break on it
    mounted = {
        "/etc/vtp/kafka-ca/ca.crt": str(tmp_path / "ca.crt"),
        "/etc/vtp/kafka-sasl/password": str(tmp_path / "password"),
    }
    known = {d.variable for d in documented_settings()}
    for component, pod in _containers(_manifests(region)).items():
        env = pod["containers"][0]["env"]
        names = [e["name"] for e in env]
        assert len(names) == len(set(names)), component
        assert set(names) <= known, f"{component}: {set(names) - known}"
        plain = {e["name"]: e["value"] for e in env if "value" in e}
        for where, here in mounted.items():
            plain = {k: v.replace(where, here) for k, v in plain.items()}
        settings = load_settings(plain)  # raises on a value vtp refuses
        assert settings.region == region and settings.metrics_host == "0.0.0.0"
        credentials = worker_credentials(settings.kafka_extra)
        assert credentials is not None and credentials.protocol.value == "SASL_SSL"
        assert credentials.password == 'pa"ss\\word with spaces', component


@pytest.mark.parametrize("region", REGIONS)
def test_secrets_reach_only_the_processes_that_use_them(region):
    pods = _containers(_manifests(region))

    def secret_env(component: str) -> set[str]:
        return {
            e["name"]
            for e in pods[component]["containers"][0]["env"]
            if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
        }

    def key_files(component: str) -> set[str]:
        volumes = {v["name"]: v for v in pods[component]["volumes"]}
        return (
            {i["path"] for i in volumes["keys"]["secret"]["items"]} if "keys" in volumes else set()
        )

    assert "VTP_WAREHOUSE" not in secret_env("worker") and key_files("worker") == set()
    assert "VTP_WAREHOUSE" not in secret_env("gateway") and key_files("gateway") == set()
    assert "VTP_WAREHOUSE" in secret_env("sink") and key_files("sink") == {"pseudonym.key"}
    serve_keys = key_files("serve")
    assert "pseudonym.key" in serve_keys and {
        p.split("/")[0] for p in serve_keys - {"pseudonym.key"}
    } == {"owner", "grant", "analyst"}
    for component, pod in pods.items():  # the edge's TLS material: the gateway's alone
        assert any(v["name"] == "pki" for v in pod["volumes"]) == (component == "gateway")
    for pod in pods.values():
        assert pod["automountServiceAccountToken"] is False
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("region", REGIONS)
def test_egress_is_an_allow_list_of_the_regions_kafka_and_clickhouse(region):
    policies = {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m["spec"]
        for m in _manifests(region)
        if m["kind"] == "NetworkPolicy"
    }
    assert set(policies) == set(_containers(_manifests(region)))  # every pod has one
    for component, spec in policies.items():
        assert "Egress" in spec["policyTypes"]
        assert all(rule.get("to") for rule in spec["egress"]), f"{component}: a rule open to all"
        blocks = {
            b["ipBlock"]["cidr"] for rule in spec["egress"] for b in rule["to"] if "ipBlock" in b
        }
        values = yaml.safe_load((HELM / f"values-{region}.yaml").read_text())
        clickhouse = set(values["clickhouse"]["egress"]["cidrs"])
        assert (clickhouse <= blocks) == (component in ("sink", "serve")), component


def test_the_operator_gets_the_rules_promtool_tests_and_targets_named_as_they_expect():
    manifests = {m["kind"]: m for m in _manifests("eu")}
    rules = yaml.safe_load((HELM.parent / "prometheus" / "rules" / "vtp.yml").read_text())
    assert manifests["PrometheusRule"]["spec"]["groups"] == rules["groups"]
    relabel = manifests["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {r["targetLabel"]: r.get("replacement", "$1") for r in relabel} == {
        "job": "vtp-$1",  # the rules select job=~"vtp-.*"
        "region": "$1",
    }


def test_with_strimzi_the_clients_log_in_as_the_kafkauser_with_its_secret():
    manifests = _manifests("cn")
    user = next(m for m in manifests if m["kind"] == "KafkaUser")["metadata"]["name"]
    for component, pod in _containers(manifests).items():
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert json.loads(env["VTP_KAFKA_EXTRA"])["sasl.username"] == user, component
        sasl = next(v for v in pod["volumes"] if v["name"] == "kafka-sasl")["secret"]
        assert (sasl["secretName"], sasl["items"]) == (
            user,
            [{"key": "password", "path": "password"}],
        )


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        (["--set", "kafka.egress.cidrs={0.0.0.0/0}"], "cidrs/0"),
        (["--set", "clickhouse.egress.cidrs={::/0}"], "cidrs/0"),
        (["--set", "worker.env.VTP_REGION=cn"], "VTP_REGION"),  # the chart's own
        (["--set", "topics.minInsync=4"], "no write could ever be acknowledged"),
        (["--set", "podDisruptionBudget.maxUnavailable=0%"], "maxUnavailable"),
        (["--set", "serve.port=9100"], "serve.port and metrics.port must differ"),
        (["--set", "gateway.port=9100"], "gateway.port and metrics.port must differ"),
        (["--set", "gateway.pki.secret="], "/gateway/pki/secret"),
        (["--set", "gateway.pki.revokedConfigMap="], "/gateway/pki/revokedConfigMap"),
        (["--set", "gateway.vehicleCidrs=null"], "vehicleCidrs"),
        (["--set", "gateway.env.VTP_GATEWAY_HOST=127.0.0.1"], "VTP_GATEWAY_HOST"),
        (["--set", "gateway.tls=x"], "additional properties 'tls' not allowed"),
    ],
)
def test_values_that_would_open_the_region_or_never_run_are_refused(values, refusal):
    done = _helm(
        "template", "x", CHART, "-f", HELM / "values-eu.yaml", "--kube-version", KUBERNETES, *values
    )
    assert done.returncode != 0 and refusal in done.stderr, done.stderr


def test_with_strimzi_the_listener_and_its_secrets_are_what_the_clients_use():
    for values in (["--set", "kafka.sasl.enabled=false"], ["--set", "kafka.sasl.mechanism=PLAIN"]):
        done = _helm(
            "template",
            "x",
            CHART,
            "-f",
            HELM / "values-cn.yaml",
            "--kube-version",
            KUBERNETES,
            *values,
        )
        assert done.returncode != 0 and "wants SCRAM-SHA-512" in done.stderr, done.stderr
    brokers = _helm(
        "template", "x", CHART, "-f", HELM / "values-cn.yaml", "--kube-version", KUBERNETES,
        "--set", "kafka.strimzi.brokers=1",
    )  # fmt: skip
    assert brokers.returncode != 0 and "more than kafka.strimzi.brokers" in brokers.stderr


def test_the_regions_data_outlives_the_release():
    kept = {
        m["kind"]
        for m in _manifests("cn")
        if m["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep"
    }
    assert kept == {"Kafka", "KafkaNodePool", "KafkaTopic"}


def test_nobody_scrapes_metrics_when_no_monitoring_namespace_is_named():
    done = _helm(
        "template", "x", CHART, "-f", HELM / "values-eu.yaml", "--kube-version", KUBERNETES,
        "--set", "monitoringNamespaces=null", "--set", "serve.clientNamespaces=null",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for policy in (
        m for m in yaml.safe_load_all(done.stdout) if m and m["kind"] == "NetworkPolicy"
    ):
        assert all(rule.get("from") for rule in policy["spec"]["ingress"] or [])


def test_a_warehouse_cluster_reaches_every_process_that_runs_migrations():
    manifests = yaml.safe_load_all(_render("eu", "--set", "clickhouse.cluster=vtp_eu"))
    pods = _containers([m for m in manifests if m])
    with_warehouse = {
        name: {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        for name, pod in pods.items()
        if any(e["name"] == "VTP_WAREHOUSE" for e in pod["containers"][0]["env"])
    }
    assert with_warehouse, "no process gets the warehouse"
    for name, env in with_warehouse.items():
        assert env.get("VTP_WAREHOUSE_CLUSTER") == "vtp_eu", name


def _gateway(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(
        m
        for m in manifests
        if m["kind"] == kind and m["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    )


@pytest.mark.parametrize("region", REGIONS)
def test_the_gateway_reads_its_pki_from_one_folder_the_kubelet_keeps_current(region):
    """VTP_PKI_DIR/<region> is one projected volume: the operator's Secret (CA, the
    gateway's certificate and key) and the deny-list ConfigMap, never a subPath (a subPath
    mount is not updated, so a revocation would need a rollout)."""
    pod = _containers(_manifests(region))["gateway"]
    container = pod["containers"][0]
    assert container["args"] == ["gateway"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = load_settings({k: v for k, v in env.items() if not k.startswith("VTP_KAFKA_")})
    assert settings.gateway_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["vehicles"] == settings.gateway_port != settings.metrics_port == ports["metrics"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "pki")
    assert mount == {"name": "pki", "mountPath": str(settings.pki_path), "readOnly": True}
    sources = next(v for v in pod["volumes"] if v["name"] == "pki")["projected"]["sources"]
    files = {
        item["path"]: kind for s in sources for kind, src in s.items() for item in src["items"]
    }
    assert files == {
        "vehicle-ca.pem": "secret",
        "gateway.pem": "secret",
        "gateway.key": "secret",
        "revoked.txt": "configMap",
    }
    # no probe opens the vehicle port: a bare TCP connection there is a refused handshake
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "metrics" in json.dumps(container[probe]) and "vehicles" not in json.dumps(
            container[probe]
        ), probe


@pytest.mark.parametrize("region", REGIONS)
def test_vehicles_reach_the_gateway_on_443_from_anywhere_and_nothing_else(region):
    manifests = _manifests(region)
    service = _gateway(manifests, "Service")["spec"]
    assert service["type"] == "LoadBalancer" and service["externalTrafficPolicy"] == "Local"
    assert service["ports"] == [
        {"name": "vehicles", "protocol": "TCP", "port": 443, "targetPort": "vehicles"}
    ]
    assert not any(m["kind"] == "Ingress" for m in manifests)  # mutual TLS ends in the gateway
    policy = _gateway(manifests, "NetworkPolicy")["spec"]
    port = {
        p["name"]: p["containerPort"]
        for p in _containers(manifests)["gateway"]["containers"][0]["ports"]
    }["vehicles"]
    vehicles = [r for r in policy["ingress"] if r["ports"] == [{"protocol": "TCP", "port": port}]]
    assert [b["ipBlock"]["cidr"] for b in vehicles[0]["from"]] == ["0.0.0.0/0", "::/0"]
    assert len(policy["egress"]) == 2  # DNS and the region's Kafka, as the worker


def test_without_the_gateway_nothing_of_it_renders():
    done = _helm(
        "template", "x", CHART, "-f", HELM / "values-eu.yaml", "--kube-version", KUBERNETES,
        "--set", "gateway.enabled=false", "--set", "gateway.pki=null",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifests = [m for m in yaml.safe_load_all(done.stdout) if m]
    assert not [m for m in manifests if m["metadata"]["name"].endswith("-gateway")]
    monitor = next(m for m in manifests if m["kind"] == "PodMonitor")
    assert monitor["spec"]["selector"]["matchExpressions"][0]["values"] == [
        "worker",
        "sink",
        "serve",
    ]


def test_a_gateway_behind_the_clusters_own_load_balancer_renders_valid():
    manifests = _render("eu", "--set", "gateway.service.type=ClusterIP")
    service = _gateway([m for m in yaml.safe_load_all(manifests) if m], "Service")["spec"]
    assert service["type"] == "ClusterIP" and "externalTrafficPolicy" not in service
    done = _kubeconform(manifests)
    assert done.returncode == 0, done.stdout + done.stderr


def _kubelet_writes(folder: Path, version: int, files: dict[str, str]) -> None:
    """What the kubelet does to a Secret, ConfigMap or projected volume that changed: the
    new files in a new hidden folder, ``..data`` swapped to it by a rename, and the names
    the pod sees symlinks through ``..data`` (its AtomicWriter)."""
    data = folder / f"..v{version}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(Path("..data") / name)
    (folder / "..data_tmp").symlink_to(data.name)
    os.replace(folder / "..data_tmp", folder / "..data")


class _Edge:
    region = "eu"

    def __init__(self) -> None:
        self.revoked: list[frozenset[int]] = []

    def forget_idle_buckets(self, now: float) -> None:
        pass

    def set_revoked(self, serials: frozenset[int]) -> list[Any]:
        self.revoked.append(serials)
        return []


def test_the_gateway_rereads_a_deny_list_the_kubelet_swapped_in(tmp_path):
    """The chart mounts the deny-list ConfigMap as a folder (no subPath) so that a
    revocation reaches running gateways: they see the swap and reread the list."""
    folder = tmp_path / "eu"
    folder.mkdir()
    _kubelet_writes(folder, 1, {"revoked.txt": "# none yet\n"})
    edge = _Edge()
    settings = load_settings({"VTP_REGION": "eu", "VTP_GATEWAY_REVOKED_RELOAD_S": "0.05"})
    gateway = Gateway(settings, edge, RegionPKI(folder, ()))  # a stub edge: only the deny-list

    async def revoke_then_wait() -> None:
        watcher = asyncio.create_task(gateway.watch_revoked())
        await asyncio.sleep(0.2)
        _kubelet_writes(folder, 2, {"revoked.txt": "# revoked\n1a2b\n"})
        for _ in range(100):
            if edge.revoked:
                break
            await asyncio.sleep(0.05)
        watcher.cancel()

    asyncio.run(revoke_then_wait())
    assert edge.revoked == [frozenset({0x1A2B})]

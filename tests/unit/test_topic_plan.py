"""Every topic a region uses, as `vtp topics` and the worker create them: the plan the
Helm chart's KafkaTopic resources are checked against (tests/deploy/test_helm.py)."""

from __future__ import annotations

from stream_jobs.app import create_app
from vtp.core.settings import load_settings
from vtp.core.topics import topic_plan, topic_specs

CLUSTER = {"VTP_REGION": "eu", "VTP_TOPIC_REPLICATION": "3", "VTP_TOPIC_MIN_INSYNC": "2"}


def test_every_topic_is_replicated_and_needs_its_in_sync_replicas():
    plan = topic_plan(load_settings(CLUSTER))
    assert {t.replicas for t in plan} == {3}
    assert all(t.config["min.insync.replicas"] == "2" for t in plan if t.config)
    by_name = {t.name: t for t in plan}
    assert by_name["vtp.eu.uploads"].config["message.timestamp.type"] == "LogAppendTime"
    assert by_name["vtp.eu.vehicles"].config["cleanup.policy"] == "compact"
    assert by_name["vtp-eu-worker-__assignor-__leader"].partitions == 1


def test_the_plan_names_what_vtp_topics_and_the_worker_create(tmp_path):
    settings = load_settings(
        {**CLUSTER, "VTP_KAFKA_BOOTSTRAP": "127.0.0.1:9", "VTP_DATA_DIR": str(tmp_path)}
    )
    app, _ = create_app(settings)  # built, never started: nothing connects
    changelogs = {t.changelog_topic.get_topic_name(): t for t in app.tables.values()}
    plan = {t.name: t for t in topic_plan(settings)}
    assert {n for n, t in plan.items() if t.created_by == "vtp topics"} == set(
        topic_specs(settings)
    )
    assert {n for n, t in plan.items() if n.endswith("-changelog")} == set(changelogs)
    for name, table in changelogs.items():
        assert {"cleanup.policy": "compact", **table.changelog_topic.config} == plan[name].config
    assert app.conf.topic_replication_factor == 3

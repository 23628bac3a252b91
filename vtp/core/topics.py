"""Create a region's topics (idempotent), and refuse topics that exist in a shape vtp
cannot work with.

Uploads, the registry and the worker's outputs share partition count and key (VIN), so
a worker holds the registry entries of the vehicles it validates: a topic that exists
with another partition count would break that silently, so it is an error. The uploads
topic stamps each message with the broker's clock (LogAppendTime): a gateway's clock
never decides how late or early its data is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported without __all__
    AdminClient,
    ConfigResource,
    NewTopic,
)

from vtp.core.kafka import ClientErrors, retry_kafka
from vtp.core.regions import REGIONS
from vtp.core.settings import Settings


class TopicError(RuntimeError):
    """A topic exists in a shape vtp cannot work with, or the cluster is another region's;
    the message says how to fix it."""


def foreign_topics(names: list[str], settings: Settings) -> list[str]:
    """Topics of this deployment's prefix that belong to another region."""
    region, prefix = settings.need_region(), settings.topic_prefix
    found = []
    for name in names:
        for other in REGIONS:
            if other != region and name.startswith(
                (f"{prefix}.{other}.", f"{prefix}-{other}-worker")
            ):
                found.append(name)
    return sorted(found)


def check_cluster_region(settings: Settings) -> None:
    """Refuse to work on a cluster that holds another region's topics: a region's
    processes talk only to that region's cluster (VTP_KAFKA_BOOTSTRAP pointing at another
    region's broker would otherwise put this region's data there)."""
    errors = ClientErrors()
    config: dict[str, Any] = {"bootstrap.servers": settings.bootstrap(), "error_cb": errors}
    admin = AdminClient({**config, **settings.kafka_extra})

    def listed() -> list[str]:
        try:
            return list(admin.list_topics(timeout=10).topics)
        except KafkaException:
            errors.raise_if_refused(admin, settings.bootstrap())
            raise

    names = retry_kafka(listed, "list topics")
    foreign = foreign_topics(names, settings)
    if foreign:
        raise TopicError(
            f"the cluster at {settings.bootstrap()} holds another region's topics "
            f"({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}); region "
            f"{settings.region}'s processes work only on region {settings.region}'s cluster: "
            "check VTP_KAFKA_BOOTSTRAP"
        )


# The worker's tables (stream_jobs declares them by these names); Faust creates their
# changelog topics, compacted, when the worker starts.
REGISTRY_TABLE, SEEN_TABLE, SESSIONS_TABLE = "vehicles", "seen_uploads", "vehicle_sessions"
WORKER_TABLES = (REGISTRY_TABLE, SEEN_TABLE, SESSIONS_TABLE)


def changelog_configs(settings: Settings) -> dict[str, str]:
    """Kafka compacts a table's changelog within this lag, so a value the worker replaced
    (an erased owner's state, a forgotten vehicle's) is gone from Kafka within it."""
    return {
        "max.compaction.lag.ms": str(int(settings.changelog_compaction_lag_s * 1000)),
        "min.insync.replicas": str(settings.topic_min_insync),
    }


def topic_specs(settings: Settings) -> dict[str, dict[str, str]]:
    """The topics `vtp topics` creates, with the configs vtp needs of them."""
    t = settings.topics
    durable = {"min.insync.replicas": str(settings.topic_min_insync)}
    return {
        t.uploads: {"message.timestamp.type": "LogAppendTime", **durable},
        t.vehicles: {"cleanup.policy": "compact", **durable},
        t.validated: durable,
        t.control: durable,
        t.aggregates: durable,
        t.deadletter: durable,
        t.quarantine: durable,
    }


@dataclass(frozen=True)
class PlannedTopic:
    name: str
    partitions: int
    replicas: int
    config: dict[str, str]
    created_by: str  # `vtp topics`, or the worker (Faust) when it starts


def topic_plan(settings: Settings) -> list[PlannedTopic]:
    """Every topic a region uses, as `vtp topics` and the worker create them: what a
    cluster operator declares up front (the Helm chart's KafkaTopic resources)."""
    n, replicas = settings.topic_partitions, settings.topic_replication
    app = settings.topics.worker_app
    plan = [
        PlannedTopic(name, n, replicas, c, "vtp topics")
        for name, c in topic_specs(settings).items()
    ]
    plan += [
        PlannedTopic(
            f"{app}-{table}-changelog",
            n,
            replicas,
            {"cleanup.policy": "compact", **changelog_configs(settings)},
            "worker",
        )
        for table in WORKER_TABLES
    ]
    # Faust's leader election: one partition, nothing stored in it
    plan.append(PlannedTopic(f"{app}-__assignor-__leader", 1, replicas, {}, "worker"))
    return plan


def create_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create the region's missing topics and check the others; returns those created."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap(), **settings.kafka_extra})
    check_cluster_region(settings)
    specs = topic_specs(settings)
    existing = retry_kafka(lambda: admin.list_topics(timeout=timeout).topics, "list topics")
    missing = [
        NewTopic(
            name,
            num_partitions=settings.topic_partitions,
            replication_factor=settings.topic_replication,
            config=config,
        )
        for name, config in specs.items()
        if name not in existing
    ]
    for _name, future in (
        admin.create_topics(missing, request_timeout=timeout) if missing else {}
    ).items():
        try:
            future.result()
        except Exception as exc:  # a concurrent creator is fine; it is checked below
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    check_topics(admin, settings, {n: c for n, c in specs.items() if n in existing}, timeout)
    return [t.topic for t in missing]


def check_topics(
    admin: AdminClient, settings: Settings, specs: dict[str, dict[str, str]], timeout: float
) -> None:
    if not specs:
        return
    meta = retry_kafka(lambda: admin.list_topics(timeout=timeout).topics, "list topics")
    problems = []
    for name in specs:
        partitions = meta[name].partitions
        if len(partitions) != settings.topic_partitions:
            problems.append(
                f"{name} has {len(partitions)} partitions, VTP_TOPIC_PARTITIONS is "
                f"{settings.topic_partitions}"
            )
        replicas = min(len(p.replicas) for p in partitions.values())
        if replicas < settings.topic_replication:
            problems.append(
                f"{name} has {replicas} replicas, VTP_TOPIC_REPLICATION is "
                f"{settings.topic_replication}"
            )
    resources = [ConfigResource("topic", name) for name, config in specs.items() if config]
    for resource, future in (admin.describe_configs(resources) if resources else {}).items():
        found = retry_kafka(partial(future.result, timeout), f"describe {resource.name}")
        for key, wanted in specs[resource.name].items():
            actual = found[key].value if key in found else None
            if actual != wanted:
                problems.append(f"{resource.name} has {key}={actual}, vtp needs {wanted}")
    if problems:
        raise TopicError(
            "topics exist in a shape vtp cannot use: "
            + "; ".join(problems)
            + ". Recreate them, or set VTP_TOPIC_* to match (more replicas are fine)."
        )

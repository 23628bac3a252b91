"""Create vtp's topics (idempotent). Uploads and the registry share partition count and
key (VIN) so a worker holds the registry entries of the vehicles it validates."""

from __future__ import annotations

from confluent_kafka.admin import AdminClient, NewTopic

from vtp.settings import Settings


def topic_specs(settings: Settings) -> dict[str, dict[str, str]]:
    t = settings.topics
    specs: dict[str, dict[str, str]] = {
        t.uploads: {},
        t.vehicles: {"cleanup.policy": "compact"},
        t.deadletter: {},
        t.quarantine: {},
    }
    for region in settings.regions:
        specs[t.validated(region)] = {}
        specs[t.aggregates(region)] = {}
    return specs


def create_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create missing topics; returns the names created now."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap(), **settings.kafka_extra})
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [
        NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=1, config=cfg)
        for name, cfg in topic_specs(settings).items()
        if name not in existing
    ]
    if not missing:
        return []
    for _name, future in admin.create_topics(missing, request_timeout=timeout).items():
        try:
            future.result()
        except Exception as exc:  # a concurrent creator is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return [t.topic for t in missing]

"""One real broker for the test session: testcontainers' Kafka where a Docker engine
answers, otherwise the project's own launcher (deploy/broker.py). Never a fake.

Tests that run a region's stack on the session broker give it topics of its own (a
prefix per test; the region is in every topic name), so tests never share topics."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from uuid import uuid4

import pytest

from vtp.core.settings import Settings, load_settings


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _kafka_container() -> type | None:
    try:
        from testcontainers.kafka import KafkaContainer
    except ImportError:
        return None
    return KafkaContainer


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a real Kafka broker that lives for the whole session."""
    container = _kafka_container() if _docker_answers() else None
    if container is not None:
        with container("apache/kafka:4.1.1") as kafka:
            yield kafka.get_bootstrap_server()
        return
    from deploy.broker import fetch_jars, start_broker, stop_broker

    settings = load_settings({}).with_(data_dir=tmp_path_factory.mktemp("kafka"))
    # fetch_jars first, as `vtp stack up` does: on a fresh machine the one-time Maven
    # download is its own step, and a missing mvn fails here with its own message.
    fetch_jars(settings)
    state = start_broker(settings)
    try:
        yield state.bootstrap
    finally:
        stop_broker(settings)  # by the pid in this session's own state file


@pytest.fixture(scope="session")
def base_settings(kafka_bootstrap: str) -> Settings:
    return load_settings({}).with_(kafka_bootstrap=kafka_bootstrap)


@pytest.fixture(scope="session")
def region_stack(
    base_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Settings]:
    """``region_stack(region, name, **settings)``: a region's settings on the session
    broker, with a data folder and topics of their own (created)."""
    from vtp.core.topics import create_topics

    def make(region: str, name: str, data_dir=None, prefix: str | None = None, **overrides):
        # A test that shortens the sink's batch wait means every batch: the aggregate
        # records' longer wait would hold each drain back by it.
        if "sink_flush_ms" in overrides:
            overrides.setdefault("sink_aggregates_flush_ms", overrides["sink_flush_ms"])
        settings = base_settings.with_(
            region=region,
            data_dir=data_dir or tmp_path_factory.mktemp(name),
            topic_prefix=prefix or f"{name}-{uuid4().hex[:6]}",
            **overrides,
        )
        create_topics(settings)
        return settings

    return make


@pytest.fixture
def topic_prefix() -> str:
    """A prefix of its own per test, so tests sharing the session broker never share topics."""
    return f"t{uuid4().hex[:8]}"

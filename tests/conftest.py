"""One real broker for the test session: testcontainers' Kafka where a Docker engine
answers, otherwise the project's own launcher (deploy/broker.py). Never a fake."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from vtp.settings import Settings, load_settings


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> Iterator[str]:
    if _docker_answers():
        try:
            from testcontainers.kafka import KafkaContainer
        except ImportError:
            KafkaContainer = None
        if KafkaContainer is not None:
            with KafkaContainer("apache/kafka:4.1.1") as kafka:
                yield kafka.get_bootstrap_server()
            return
    from deploy.broker import fetch_jars, start_broker, stop_broker

    settings = load_settings().with_(data_dir=tmp_path_factory.mktemp("kafka"))
    fetch_jars(settings)
    state = start_broker(settings)
    try:
        yield state.bootstrap
    finally:
        stop_broker(settings)


@pytest.fixture(scope="session")
def base_settings(kafka_bootstrap: str) -> Settings:
    return load_settings().with_(kafka_bootstrap=kafka_bootstrap)

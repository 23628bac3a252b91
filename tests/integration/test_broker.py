"""The local broker launcher, on real processes: every broker a test starts, the test
stops by its own pid."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from deploy import broker
from deploy.broker import (
    BrokerError,
    broker_status,
    fetch_jars,
    jars_dir,
    read_state,
    start_broker,
    stop_broker,
    wait_until_answers,
)
from vtp.core.settings import load_settings

pytestmark = pytest.mark.integration


def _round_trip(bootstrap: str, topic: str) -> None:
    """Create a topic (the broker creates none on first use), produce one message to it
    and read it back."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    delivered = []
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"hello", on_delivery=lambda e, m: delivered.append(e))
    assert producer.flush(30) == 0 and delivered == [None], delivered
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    try:
        for _ in range(60):
            m = consumer.poll(1.0)
            if m is not None and not m.error():
                assert (m.key(), m.value()) == (b"k", b"hello")
                return
        pytest.fail(f"message produced to {topic} not consumed")
    finally:
        consumer.close()


def _free_port(avoid: int) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != avoid:
            return port


def test_session_broker_answers_and_round_trips(kafka_bootstrap, topic_prefix):
    wait_until_answers(kafka_bootstrap, 10)
    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert len(metadata.brokers) == 1
    _round_trip(kafka_bootstrap, f"{topic_prefix}.roundtrip")


def test_a_taken_port_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings().with_(data_dir=tmp_path, broker_port=port)
        try:
            with pytest.raises(BrokerError, match=f"port 127.0.0.1:{port} is already in use"):
                start_broker(settings)
        finally:
            stop_broker(settings)  # only if the check failed and one started after all
    assert read_state(settings) is None
    assert not (tmp_path / "broker" / "data").exists()  # refused before touching storage


def test_start_status_stop_by_pid_and_restart(tmp_path, topic_prefix):
    settings = load_settings().with_(data_dir=tmp_path)
    state = start_broker(settings)
    try:
        assert read_state(settings) == state
        assert f"running: pid {state.pid} at {state.bootstrap}" in broker_status(settings)
        with pytest.raises(BrokerError, match=f"already runs \\(pid {state.pid}\\)"):
            start_broker(settings)
    finally:
        assert stop_broker(settings)
    assert not Path(f"/proc/{state.pid}").exists()  # stopped and reaped
    assert read_state(settings) is None
    assert "no local broker" in broker_status(settings)
    assert stop_broker(settings) is False

    # A stale state file (dead pid) is ignored; storage formatted before is reused even
    # though both ports change (the quorum voters live in server.properties only).
    (tmp_path / "broker" / "state.json").write_text(state.to_json())
    new_port = _free_port(avoid=state.port)
    again = start_broker(settings.with_(broker_port=new_port))
    try:
        assert (again.port, again.bootstrap) == (new_port, f"127.0.0.1:{new_port}")
        assert again.pid != state.pid
        assert read_state(settings) == again
        _round_trip(again.bootstrap, f"{topic_prefix}.after-restart")  # controller works
    finally:
        assert stop_broker(settings)
    assert not Path(f"/proc/{again.pid}").exists()


def test_missing_java_and_maven_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    fresh = load_settings().with_(data_dir=tmp_path / "d", cache_dir=tmp_path / "cache")
    with pytest.raises(BrokerError, match="mvn not found"):
        fetch_jars(fresh)
    assert not (tmp_path / "cache" / "kafka" / fresh.kafka_version / ".complete").exists()
    with pytest.raises(BrokerError, match="java not found"):
        start_broker(fresh)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(BrokerError, match=r"JAVA_HOME=.*no-jdk has no bin/java"):
        start_broker(fresh)


def test_fetched_jars_are_not_fetched_again(tmp_path, monkeypatch):
    settings = load_settings().with_(cache_dir=tmp_path / "cache")
    libs = jars_dir(settings)
    libs.mkdir(parents=True)
    (libs.parent / ".complete").write_text(settings.kafka_version)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no mvn: must not be needed
    assert fetch_jars(settings) == libs


def test_a_cluster_id_starting_with_a_dash_formats(tmp_path, monkeypatch):
    # urlsafe base64 of a UUID starts with "-" when its first byte is 0xf8..0xfb
    monkeypatch.setattr(broker.uuid, "uuid4", lambda: uuid.UUID(bytes=b"\xf8" * 16))
    settings = load_settings().with_(data_dir=tmp_path)
    libs = fetch_jars(settings)
    data, properties = tmp_path / "data", tmp_path / "server.properties"
    properties.write_text(broker._server_properties(data, 19092, 19093))
    broker._format_once(broker._java(), libs, data, properties)
    assert "cluster.id=-" in (data / "meta.properties").read_text()

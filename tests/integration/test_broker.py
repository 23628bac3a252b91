"""The local broker launcher, on real processes."""

import os
import socket
import uuid

import pytest
from confluent_kafka import Consumer, Producer

from deploy.broker import (
    BrokerError,
    broker_status,
    fetch_jars,
    read_state,
    start_broker,
    stop_broker,
)
from vtp.settings import load_settings

pytestmark = pytest.mark.integration


def test_session_broker_round_trip(kafka_bootstrap):
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, key=b"k", value=b"hello")
    assert producer.flush(30) == 0
    consumer = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": topic, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    try:
        for _ in range(60):
            m = consumer.poll(1.0)
            if m is not None and not m.error():
                assert (m.key(), m.value()) == (b"k", b"hello")
                break
        else:
            pytest.fail("message not consumed")
    finally:
        consumer.close()


def test_start_status_stop_by_pid_and_restart(tmp_path):
    settings = load_settings().with_(data_dir=tmp_path)
    state = start_broker(settings)
    try:
        assert read_state(settings) == state
        assert f"pid {state.pid}" in broker_status(settings)
        with pytest.raises(BrokerError, match="already runs"):
            start_broker(settings)
    finally:
        assert stop_broker(settings)
    assert not os.path.exists(f"/proc/{state.pid}") or _is_zombie(state.pid)
    assert read_state(settings) is None
    assert "no local broker" in broker_status(settings)
    assert stop_broker(settings) is False
    again = start_broker(settings)  # storage formatted before: starts again
    try:
        assert again.pid != state.pid
    finally:
        stop_broker(settings)


def _is_zombie(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def test_a_taken_port_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings().with_(data_dir=tmp_path, broker_port=port)
        with pytest.raises(BrokerError, match=f"port 127.0.0.1:{port} is already in use"):
            start_broker(settings)
    assert read_state(settings) is None


def test_missing_java_and_maven_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    fresh = load_settings().with_(data_dir=tmp_path / "d", cache_dir=tmp_path / "cache")
    with pytest.raises(BrokerError, match="mvn not found"):
        fetch_jars(fresh)
    cached = load_settings().with_(data_dir=tmp_path / "d")  # jars present, java missing
    with pytest.raises(BrokerError, match="java not found"):
        start_broker(cached)

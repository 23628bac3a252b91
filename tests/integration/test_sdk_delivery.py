"""What the SDK says when the broker does not take its messages."""

import socket

import pytest

from producers.sdk import TelemetryPublisher

pytestmark = pytest.mark.integration

VIN = "LRW3E7EK4NC000001"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_undelivered_uploads_are_reported_by_id():
    publisher = TelemetryPublisher(
        f"127.0.0.1:{closed_port()}",
        "vtp.uploads",
        max_samples=2,
        kafka_extra={"message.timeout.ms": 1500, "log_level": 0},
    )
    for seq in range(5):
        publisher.add_sample(VIN, {"event_time_ms": 1_000 + seq, "seq": seq, "speed": 1.0})
    report = publisher.close(timeout=20)
    assert not report.ok
    assert report.delivered == 0
    assert len(report.failed) == 3  # 2 + 2 samples sent full, 1 flushed by close()
    upload_ids = [upload_id for upload_id, _ in report.failed]
    assert len(set(upload_ids)) == 3 and all(len(u) == 36 for u in upload_ids)
    assert all(
        "timed out" in error.lower() or "timeout" in error.lower() for _, error in report.failed
    )


def test_due_buffers_are_sent_by_age(kafka_bootstrap):
    from confluent_kafka.admin import AdminClient, NewTopic

    # brokers do not create topics on first use: vtp creates the ones it writes to
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    made = admin.create_topics([NewTopic("sdk-age-test", num_partitions=1, replication_factor=1)])
    made["sdk-age-test"].result(30)
    publisher = TelemetryPublisher(kafka_bootstrap, "sdk-age-test", max_samples=100, max_age_s=0.0)
    publisher.add_sample(VIN, {"event_time_ms": 1_000, "seq": 1, "speed": 1.0})
    assert publisher.publish_due() == 1
    report = publisher.close(timeout=30)
    assert report.ok and report.delivered == 1

"""Every Kafka client of a region over TLS with SCRAM-SHA-512, as the Helm chart's
Strimzi cluster asks for it: topics, the gateways' SDK, the worker (aiokafka, through
Faust), the sink. The broker is the project's launcher with a SASL_SSL listener, its
certificate made here (trustme); a client with the wrong password gets nowhere."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import uuid4

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from deploy.broker import SecureListener, fetch_jars, start_broker, stop_broker
from producers.publish import publish_fleet, register_fleet
from producers.simulator import build_fleet
from vtp.core.settings import Settings, load_settings
from vtp.core.topics import create_topics
from vtp.harness import read_outcomes, start_sink, start_worker, stored_uploads, wait_drained

pytestmark = pytest.mark.e2e
PASSWORD = f"pw-{uuid4().hex}"


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory) -> tuple[Settings, str]:
    """A broker whose SASL_SSL listener knows user vtp; the region settings that reach it."""
    folder = tmp_path_factory.mktemp("secure-kafka")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), password=None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    keystore = folder / "broker.pem"
    keystore.write_bytes(pkcs8 + b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    broker_settings = load_settings({}).with_(data_dir=folder / "broker")
    fetch_jars(broker_settings)
    state = start_broker(broker_settings, secure=SecureListener(keystore, {"vtp": PASSWORD}))
    password_file = folder / "sasl-password"  # as the Helm chart mounts it
    password_file.write_text(PASSWORD)
    try:
        region = load_settings({}).with_(
            region="eu",
            data_dir=folder / "region",
            topic_prefix=f"tls{uuid4().hex[:6]}",
            kafka_bootstrap=state.secure_bootstrap,
            kafka_extra={
                "security.protocol": "SASL_SSL",
                "ssl.ca.location": str(ca_file),
                "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": "vtp",
            },
            kafka_sasl_password_file=str(password_file),
            sink_batch_messages=200,
            sink_flush_ms=300,
            sink_aggregates_flush_ms=300,
        )
        yield region, state.bootstrap
    finally:
        stop_broker(broker_settings)


def test_the_whole_region_runs_over_tls_with_scram(secure_cluster):
    settings, _ = secure_cluster
    assert create_topics(settings)  # the admin client, over SASL_SSL
    fleet = build_fleet(31, owners=2, vehicles=3, regions=("eu",))
    register_fleet(settings, fleet)
    processes = [start_worker(settings), start_sink(settings)]
    try:
        published = publish_fleet(settings, fleet, seed=31, duration_s=5 * 60)
        assert published.report.ok
        assert wait_drained(settings, processes, timeout=180)
    finally:
        for p in processes:
            p.stop()
    stored = stored_uploads(settings)
    assert stored == published.uploads and read_outcomes(settings).deadlettered_total == 0
    for process in processes:
        assert PASSWORD not in process.log_path.read_text()


def test_a_worker_with_the_wrong_password_fails_and_says_why(secure_cluster):
    settings, _ = secure_cluster
    wrong_file = Path(settings.kafka_sasl_password_file).with_name("wrong-password")
    wrong_file.write_text("not-it")
    extra = {k: v for k, v in settings.kafka_extra.items() if k != "sasl.password"}
    wrong = settings.with_(kafka_extra=extra, kafka_sasl_password_file=str(wrong_file))
    worker = start_worker(wrong)
    try:
        deadline = time.monotonic() + 120
        while worker.exited() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        code = worker.exited()  # before stop(), which would end it anyway
        log = worker.log_path.read_text()
    finally:
        worker.stop()
    assert code == 1, log[-2000:]
    assert "refused the connection (sasl_ssl://" in log and "check VTP_KAFKA_EXTRA" in log
    assert "not-it" not in log

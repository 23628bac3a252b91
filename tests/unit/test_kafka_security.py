"""The worker's Kafka security comes from the same librdkafka keys as every other
client's; what it cannot honour is refused by name, never dropped."""

from __future__ import annotations

import ssl

import faust
import pytest
import trustme

from stream_jobs.kafka_security import KafkaSecurityError, worker_credentials
from vtp.core.settings import SettingsError

SCRAM = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "vtp",
    "sasl.password": "s3cret",
    "client.id": "vtp-worker",  # librdkafka tuning: not the worker's business
}


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def test_plaintext_needs_no_credentials():
    assert worker_credentials({}) is None
    assert worker_credentials({"security.protocol": "plaintext", "linger.ms": 5}) is None


def test_sasl_ssl_with_scram_trusts_the_given_ca(ca_file):
    credentials = worker_credentials({**SCRAM, "ssl.ca.location": ca_file})
    assert isinstance(credentials, faust.SASLCredentials)
    assert (
        credentials.protocol.value == "SASL_SSL" and credentials.mechanism.value == "SCRAM-SHA-512"
    )
    assert (credentials.username, credentials.password) == ("vtp", "s3cret")
    context = credentials.ssl_context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # the given CA, not the system's


def test_ssl_alone_and_hostname_checks_off_when_asked(ca_file):
    credentials = worker_credentials(
        {
            "security.protocol": "SSL",
            "ssl.ca.location": ca_file,
            "ssl.endpoint.identification.algorithm": "none",
        }
    )
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.context.check_hostname is False


@pytest.mark.parametrize(
    ("extra", "refusal"),
    [
        (
            {"security.protocol": "SASL_SSL", "sasl.oauthbearer.config": "x"},
            "sasl.oauthbearer.config",
        ),
        ({"security.protocol": "SSL", "ssl.keystore.location": "k.p12"}, "ssl.keystore.location"),
        ({"security.protocol": "TLS"}, "'TLS' is not one of"),
        ({**SCRAM, "sasl.mechanism": "GSSAPI"}, "'GSSAPI' is not one of"),
        ({**SCRAM, "sasl.password": ""}, "needs sasl.username and sasl.password"),
        ({"security.protocol": "SSL", "ssl.certificate.location": "c.pem"}, "needs both"),
        (  # the librdkafka clients would stop verifying; the worker must not differ
            {"security.protocol": "SSL", "enable.ssl.certificate.verification": "false"},
            "enable.ssl.certificate.verification",
        ),
        ({k: v for k, v in SCRAM.items() if k != "sasl.mechanism"}, "'' is not one of"),
    ],
)
def test_what_the_worker_cannot_honour_is_refused_by_name(extra, refusal):
    with pytest.raises(KafkaSecurityError, match=refusal) as refused:
        worker_credentials(extra)
    assert isinstance(refused.value, SettingsError)  # `vtp worker` exits 2 with the message
    assert "s3cret" not in str(refused.value)


def test_a_refused_login_seen_only_by_callback_is_raised_not_retried():
    from confluent_kafka import KafkaError

    from vtp.core.kafka import ClientErrors, KafkaRefused

    class Client:
        def __init__(self, errors: ClientErrors):
            self.errors = errors

        def poll(self, timeout: float) -> int:  # librdkafka serves error_cb here
            self.errors(KafkaError(KafkaError._ALL_BROKERS_DOWN))
            self.errors(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error"))
            return 0

    errors = ClientErrors()
    quiet = ClientErrors()
    quiet.raise_if_refused(type("Idle", (), {"poll": lambda self, t: 0})(), "b:9093")  # nothing
    with pytest.raises(
        KafkaRefused, match=r"at b:9093 refused the connection .*SASL authentication"
    ):
        errors.raise_if_refused(Client(errors), "b:9093")

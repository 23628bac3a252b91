"""The worker's Kafka security, from the same librdkafka keys every other vtp client
reads (``VTP_KAFKA_EXTRA``): the worker's client is aiokafka (through Faust), so the
keys are translated into Faust's credentials here.

An allow-list: the keys below are translated; any other ``ssl.*`` or ``sasl.*`` key,
and any protocol or mechanism not listed, is refused with the key's name, because
silently dropping one would leave the worker less protected than the operator asked
for (or unable to connect, with a less clear error). librdkafka's tuning keys
(``linger.ms``, ``client.id`` …) do not apply to aiokafka and are left to the other
clients.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import faust

from vtp.core.settings import SettingsError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
TRANSLATED = frozenset(
    {
        "security.protocol",
        "ssl.ca.location",
        "ssl.certificate.location",
        "ssl.key.location",
        "ssl.key.password",
        "ssl.endpoint.identification.algorithm",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.password",
    }
)


class KafkaSecurityError(SettingsError):
    """VTP_KAFKA_EXTRA asks for security the worker cannot provide."""


def _ssl_context(extra: Mapping[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=extra.get("ssl.ca.location"))
    if str(extra.get("ssl.endpoint.identification.algorithm", "https")).lower() == "none":
        context.check_hostname = False  # librdkafka's way of saying the same
    if extra.get("ssl.certificate.location") or extra.get("ssl.key.location"):
        if not (extra.get("ssl.certificate.location") and extra.get("ssl.key.location")):
            raise KafkaSecurityError(
                "VTP_KAFKA_EXTRA: a client certificate needs both ssl.certificate.location "
                "and ssl.key.location"
            )
        context.load_cert_chain(
            extra["ssl.certificate.location"],
            extra["ssl.key.location"],
            password=extra.get("ssl.key.password"),
        )
    return context


def worker_credentials(extra: Mapping[str, Any]) -> faust.types.auth.CredentialsT | None:
    """Faust's broker credentials for ``extra``; None for plaintext."""
    unknown = sorted(
        k
        for k in extra
        if k.startswith(("ssl.", "sasl.", "security.", "enable.ssl.")) and k not in TRANSLATED
    )
    if unknown:
        raise KafkaSecurityError(
            f"VTP_KAFKA_EXTRA: the worker (aiokafka) has no equivalent of {', '.join(unknown)}; "
            f"it understands {', '.join(sorted(TRANSLATED))}"
        )
    protocol = str(extra.get("security.protocol", "PLAINTEXT")).upper()
    if protocol not in PROTOCOLS:
        raise KafkaSecurityError(
            f"VTP_KAFKA_EXTRA: security.protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}"
        )
    if protocol == "PLAINTEXT":
        return None
    context = _ssl_context(extra) if protocol.endswith("SSL") else None
    if not protocol.startswith("SASL"):
        return faust.SSLCredentials(context)
    # No default: librdkafka's is GSSAPI, aiokafka's PLAIN; the two must not disagree.
    mechanism = str(extra.get("sasl.mechanism") or extra.get("sasl.mechanisms") or "").upper()
    if mechanism not in MECHANISMS:
        raise KafkaSecurityError(
            f"VTP_KAFKA_EXTRA: sasl.mechanism {mechanism!r} is not one of {', '.join(MECHANISMS)}"
        )
    if not extra.get("sasl.username") or not extra.get("sasl.password"):
        raise KafkaSecurityError(
            f"VTP_KAFKA_EXTRA: {protocol} needs sasl.username and sasl.password"
        )
    return faust.SASLCredentials(
        username=str(extra["sasl.username"]),
        password=str(extra["sasl.password"]),
        ssl_context=context,
        mechanism=mechanism,
    )

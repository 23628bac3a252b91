"""Kafka pieces every server-side stage shares: the producer configuration, and retries of
admin and metadata calls through the errors a cluster recovers from.

librdkafka marks few errors of synchronous calls (watermarks, committed offsets, admin
futures) as retriable, yet a leader election or a coordinator still loading answers
exactly those calls with NOT_LEADER_FOR_PARTITION or COORDINATOR_LOAD_IN_PROGRESS for a
moment. Those codes are retried here with backoff; anything else, or a transient error
that outlasts the attempts, is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message

log = logging.getLogger("vtp.kafka")
T = TypeVar("T")


def producer_config(bootstrap: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """librdkafka settings for a producer into a region's cluster (``extra`` passes the
    operator's own keys through, security included)."""
    return {
        "bootstrap.servers": bootstrap,
        # Idempotence: a retried send never duplicates a message in the partition.
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 20,
        # Java-compatible hashing, so VIN keys land where Faust/aiokafka expect them.
        "partitioner": "murmur2_random",
        **(extra or {}),
    }


TRANSIENT = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._WAIT_COORD,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._RESOLVE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.UNSTABLE_OFFSET_COMMIT,
    }
)


# librdkafka reports a refused login or TLS handshake only to the client's error_cb; a
# synchronous call just times out with _TRANSPORT, which is worth retrying otherwise.
REFUSED = frozenset(
    {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL}
)


class KafkaRefused(RuntimeError):
    """The cluster refused this client's credentials or TLS: retrying will not help."""


class ClientErrors:
    """A librdkafka ``error_cb`` that keeps the errors only callbacks report, so a call
    that keeps timing out can say why (``raise_if_refused``)."""

    def __init__(self) -> None:
        self.refused: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        if error.code() in REFUSED:
            self.refused = error

    def raise_if_refused(self, client: Any, bootstrap: str) -> None:
        client.poll(0)  # serves the callbacks waiting since the call
        if self.refused is not None:
            raise KafkaRefused(
                f"the Kafka cluster at {bootstrap} refused the connection "
                f"({self.refused.str()}); check VTP_KAFKA_EXTRA (security.protocol, ssl.*, "
                "sasl.*) and VTP_KAFKA_BOOTSTRAP"
            )


def is_transient(exc: BaseException) -> bool:
    if not isinstance(exc, KafkaException) or not exc.args:
        return False
    error = exc.args[0]
    if not isinstance(error, KafkaError):
        return False
    return error.retriable() or error.code() in TRANSIENT


def coordinates(message: Message) -> tuple[str, int, int]:
    """A consumed message's topic, partition and offset. librdkafka sets all three on every
    message and partition-EOF event a consumer hands out; the stubs allow None because a
    Message may also be built by hand."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


def retry_kafka(call: Callable[[], T], what: str, attempts: int = 20, backoff_s: float = 0.25) -> T:
    """``call()``, retried on transient Kafka errors with a growing pause (capped at 2 s)."""
    pause = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except KafkaException as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            if attempt in (1, attempts // 2):
                log.warning("%s: %s; retrying (attempt %d of %d)", what, exc, attempt, attempts)
            time.sleep(pause)
            pause = min(2.0, pause * 1.5)
    raise AssertionError("unreachable")

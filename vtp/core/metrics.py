"""Prometheus metrics of every long-running vtp process (one registry per process)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

UPLOADS_IN = Counter("vtp_uploads_in_total", "Raw uploads read by the validate job")
SAMPLES_ROUTED = Counter(
    "vtp_samples_routed_total", "Samples in uploads routed to a region", ["region"]
)
UPLOADS_ROUTED = Counter("vtp_uploads_routed_total", "Uploads routed to a region", ["region"])
DEADLETTERED = Counter(
    "vtp_deadlettered_total", "Messages sent to the dead-letter topic", ["stage", "reason"]
)
QUARANTINED = Counter("vtp_quarantined_total", "Uploads quarantined (region unknown)", ["reason"])
REGISTRY_UPDATES = Counter("vtp_registry_updates_total", "Vehicle registry entries applied")
AGGREGATE_RECORDS = Counter(
    "vtp_aggregate_records_total", "Trip/charge/day records emitted", ["region", "kind", "final"]
)
STATES_SCRUBBED = Counter(
    "vtp_worker_states_scrubbed_total",
    "Vehicle session states rewritten without an erased owner's data",
)
STATES_EXPIRED = Counter(
    "vtp_worker_states_expired_total",
    "Per-vehicle states removed after the vehicle was quiet for VTP_VEHICLE_STATE_TTL_S",
    ["table"],
)
AGGREGATE_TOO_LATE = Counter(
    "vtp_aggregate_too_late_samples_total",
    "Samples older than what aggregation had released (dead-lettered as too_late)",
    ["region"],
)
SINK_UPLOADS = Counter("vtp_sink_uploads_stored_total", "Uploads inserted", ["region"])
SINK_SAMPLES = Counter("vtp_sink_samples_stored_total", "Samples inserted", ["region"])
SINK_UPLOADS_BY_PATH = Counter(
    "vtp_sink_uploads_by_path_total",
    "Uploads the sink stored whole from their Avro bodies (path=avro) or decoded and judged "
    "sample by sample (path=python: another schema version, a sale, an erasure, a resend)",
    ["region", "path"],
)
SINK_ERASED_DROPPED = Counter(
    "vtp_sink_erased_dropped_total",
    "Samples and aggregate records not stored because their owner erased that time",
    ["region", "kind"],
)
SINK_REPLAYS_SKIPPED = Counter(
    "vtp_sink_replayed_uploads_skipped_total",
    "Uploads already stored from the same raw message (worker replay), not inserted again",
    ["region"],
)
SINK_BATCH_MESSAGES = Histogram(
    "vtp_sink_batch_messages",
    "Messages per sink insert batch",
    ["region"],
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
SINK_WRITE_FAILURES = Counter(
    "vtp_sink_write_failures_total", "Batch writes that failed and were tried again", ["region"]
)
SINK_UP = Gauge("vtp_sink_up", "1 while the region's sink runs, 0 while it restarts", ["region"])
SINK_RESTARTS = Counter("vtp_sink_restarts_total", "Times the sink was started again", ["region"])
SINK_BATCH_UPLOADS = Histogram(
    "vtp_sink_batch_uploads",
    "Uploads per sink batch of the validated topic (a batch message counts its uploads)",
    ["region"],
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
SINK_INSERT_SECONDS = Histogram(
    "vtp_sink_insert_seconds",
    "Time to write one round: the upload batches of every ready partition, or one batch of "
    "aggregate records",
    ["region"],
)
ANALYST_QUERIES = Counter(
    "vtp_analyst_queries_total",
    "Analyst SQL queries by outcome: ok, query_refused (not allowed), query_failed, "
    "query_cancelled (a limit was reached), too_many_queries (all slots busy)",
    ["region", "outcome"],
)
ERASURES_PENDING = Gauge(
    "vtp_erasures_pending", "Erasures requested and not completed yet", ["region"]
)
ERASURE_OLDEST_PENDING_SECONDS = Gauge(
    "vtp_erasure_oldest_pending_seconds",
    "How long ago the oldest pending erasure was requested (0 when none is pending)",
    ["region"],
)
ERASURES_COMPLETED = Counter("vtp_erasures_completed_total", "Erasures completed", ["region"])
CONSUMER_LAG = Gauge(
    "vtp_consumer_lag_messages", "High watermark minus position", ["group", "topic", "partition"]
)


def forget_lag(group: str, partitions: Iterable[tuple[str, int]]) -> None:
    """Partitions this process no longer reads: their lag is another member's to report
    (a value left here would stay frozen and count twice in the sums)."""
    for topic, partition in partitions:
        with contextlib.suppress(KeyError):
            CONSUMER_LAG.remove(group, topic, str(partition))


def serve_metrics(port: int, host: str = "127.0.0.1") -> int | None:
    """Serve /metrics on ``host`` (loopback unless a deployment opens it); port 0 means
    off. Returns the port served."""
    if port <= 0:
        return None
    start_http_server(port, addr=host)
    return port


# The vehicle edge (`vtp gateway`).
GATEWAY_CONNECTIONS = Gauge(
    "vtp_gateway_connections", "Vehicles connected (one stream each)", ["region"]
)
GATEWAY_CONNECTIONS_REFUSED = Counter(
    "vtp_gateway_connections_refused_total",
    "Verified TLS connections refused before the stream opened: not_a_vehicle (the "
    "certificate names no VIN), revoked, too_many_connections",
    ["region", "reason"],
)
GATEWAY_TCP_ACCEPTED = Counter(
    "vtp_gateway_tcp_accepted_total",
    "TCP connections accepted (each then shakes hands)",
    ["region"],
)
GATEWAY_HANDSHAKES_REFUSED = Counter(
    "vtp_gateway_handshakes_refused_total",
    "TLS handshakes that failed: no certificate, one not from the region's vehicle CA, "
    "expired, not for client authentication, or not finished within 10 s",
    ["region"],
)
GATEWAY_ACCEPTED = Counter(
    "vtp_gateway_uploads_accepted_total",
    "Uploads Kafka acknowledged and the vehicle was told",
    ["region"],
)
GATEWAY_REFUSED = Counter(
    "vtp_gateway_uploads_refused_total",
    "Uploads refused for good (never storable), by reason",
    ["region", "reason"],
)
GATEWAY_RETRIED = Counter(
    "vtp_gateway_uploads_retried_total",
    "Uploads the vehicle was told to send again later: rate_limited, kafka_backlog, "
    "kafka_unavailable, held (behind one of those on its stream)",
    ["region", "reason"],
)
GATEWAY_OVERSIZE = Counter(
    "vtp_gateway_oversize_frames_total",
    "Streams closed for a frame over the upload size limit (1009)",
    ["region"],
)
GATEWAY_ACK_SECONDS = Histogram(
    "vtp_gateway_ack_seconds",
    "From an upload's arrival to Kafka's acknowledgement",
    ["region"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GATEWAY_INFLIGHT_BYTES = Gauge(
    "vtp_gateway_inflight_bytes", "Upload bytes waiting for Kafka's acknowledgement", ["region"]
)
GATEWAY_BACKPRESSURE = Gauge(
    "vtp_gateway_backpressure",
    "1 while the gateway tells vehicles to retry because Kafka is behind (kafka_backlog)",
    ["region"],
)
GATEWAY_REVOKED = Gauge(
    "vtp_gateway_revoked_serials", "Certificate serials in the deny-list in force", ["region"]
)
GATEWAY_REVOKED_RELOAD_FAILURES = Counter(
    "vtp_gateway_revoked_reload_failures_total",
    "Deny-list rereads that failed (the previous list stays in force)",
    ["region"],
)

"""Consumer lag is reported by the member that reads a partition: one that loses it
stops reporting it, so sums over the group never count a frozen value."""

from __future__ import annotations

from prometheus_client import REGISTRY

from vtp.core import metrics


def _lag(group: str, topic: str, partition: int) -> float | None:
    labels = {"group": group, "topic": topic, "partition": str(partition)}
    return REGISTRY.get_sample_value("vtp_consumer_lag_messages", labels)


def test_a_revoked_partition_stops_reporting_lag_and_the_others_keep_theirs():
    for partition, lag in ((0, 120), (1, 7)):
        metrics.CONSUMER_LAG.labels("g-lag", "t.lag", str(partition)).set(lag)
    metrics.forget_lag("g-lag", [("t.lag", 0), ("t.lag", 5)])  # 5 was never reported
    assert _lag("g-lag", "t.lag", 0) is None
    assert _lag("g-lag", "t.lag", 1) == 7

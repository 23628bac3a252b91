"""The one settings object, read from ``VTP_*`` environment variables.

Every default runs locally: the broker address comes from the state file that
``vtp stack up`` writes, the warehouse is the embedded ClickHouse engine (chdb)
in a folder per region under the data directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """A ``VTP_*`` variable has a value that cannot be used."""


def _env(name: str, default: str) -> str:
    return os.environ.get(f"VTP_{name}", default)


def _int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"VTP_{name}={raw!r} is not a whole number") from None


def _float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"VTP_{name}={raw!r} is not a number") from None


def _json_map(name: str) -> dict[str, Any]:
    raw = _env(name, "{}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"VTP_{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise SettingsError(f"VTP_{name} must be a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Settings:
    # Where state lives: broker logs and data, chdb warehouses, cached jars.
    data_dir: Path = REPO_ROOT / "var"
    cache_dir: Path = REPO_ROOT / ".cache"
    # Kafka. Empty bootstrap means "the broker that `vtp stack up` started".
    kafka_bootstrap: str = ""
    kafka_version: str = "4.1.1"
    # Port of the local broker `vtp stack up` starts; 0 picks a free loopback port.
    broker_port: int = 0
    # librdkafka / aiokafka keys passed through unchanged (operators know them).
    kafka_extra: dict[str, Any] = field(default_factory=dict)
    topic_prefix: str = "vtp"
    topic_partitions: int = 4
    regions: tuple[str, ...] = ("cn", "eu")
    # Validation.
    max_clock_skew_s: float = 300.0
    max_backlog_s: float = 7 * 86400.0
    # Upload ids remembered per vehicle to catch resends; older resends are caught
    # by the sink, which refuses an upload id it already stored from another message.
    dedup_uploads_per_vehicle: int = 64
    # Aggregation: a trip ends after this long parked, a charge after this long not
    # charging; samples may arrive this much out of event-time order.
    trip_gap_s: float = 300.0
    charge_gap_s: float = 300.0
    allowed_lateness_s: float = 120.0
    # A worker behind on a partition that read nothing from it for this long restarts
    # itself in place (see stream_jobs/faust_fixes.py, fix 4); 0 turns that off.
    worker_stall_s: float = 60.0
    # Sink: batches are cut by message count per partition (never by time alone,
    # see sinks/batching.py); the flush interval only bounds how long a partial
    # batch waits, and the batch it produces is recorded before it is inserted.
    sink_batch_messages: int = 2000
    sink_flush_ms: int = 500
    # Names this sink process in its consumer group (static membership); give each
    # process of a region its own when running several.
    sink_instance: str = "0"
    # Warehouse: "chdb" (embedded, a folder per region) or an http(s) URL of a
    # ClickHouse server, e.g. http://user:pass@host:8123/vtp_{region}.
    warehouse: str = "chdb"
    # Prometheus: 0 disables the endpoint; each process adds its own offset.
    metrics_port: int = 0
    # Owner API (`vtp serve`): loopback by default; port 0 picks a free one and writes
    # the address to <data_dir>/serve-<region>.json. Tokens are signed with this key;
    # empty means a random key kept in <data_dir>/owner_api/signing.key (local use only).
    api_host: str = "127.0.0.1"
    api_port: int = 0
    api_signing_key: str = ""
    owner_token_ttl_s: int = 3600

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix, self.regions)

    def warehouse_path(self, region: str) -> Path:
        return self.data_dir / "warehouse" / region

    def bootstrap(self) -> str:
        """The broker address: VTP_KAFKA_BOOTSTRAP, else the local stack's state file."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        from deploy.broker import read_state

        state = read_state(self)
        if state is None:
            raise SettingsError(
                "no broker: set VTP_KAFKA_BOOTSTRAP=host:port or start one with `vtp stack up`"
            )
        return state.bootstrap

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


@dataclass(frozen=True)
class Topics:
    prefix: str
    regions: tuple[str, ...]

    @property
    def uploads(self) -> str:
        return f"{self.prefix}.uploads"

    @property
    def vehicles(self) -> str:
        return f"{self.prefix}.vehicles"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def quarantine(self) -> str:
        return f"{self.prefix}.quarantine"

    def validated(self, region: str) -> str:
        return f"{self.prefix}.validated.{region}"

    def aggregates(self, region: str) -> str:
        return f"{self.prefix}.aggregates.{region}"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build Settings from the environment (``environ`` replaces os.environ in tests)."""
    saved = None
    if environ is not None:
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(environ)
    try:
        regions = tuple(r.strip().lower() for r in _env("REGIONS", "cn,eu").split(",") if r.strip())
        if not regions:
            raise SettingsError("VTP_REGIONS lists no region")
        data_dir = Path(_env("DATA_DIR", str(REPO_ROOT / "var"))).resolve()
        settings = Settings(
            data_dir=data_dir,
            cache_dir=Path(_env("CACHE_DIR", str(REPO_ROOT / ".cache"))).resolve(),
            kafka_bootstrap=_env("KAFKA_BOOTSTRAP", ""),
            kafka_version=_env("KAFKA_VERSION", "4.1.1"),
            broker_port=_int("BROKER_PORT", 0),
            kafka_extra=_json_map("KAFKA_EXTRA"),
            topic_prefix=_env("TOPIC_PREFIX", "vtp"),
            topic_partitions=_int("TOPIC_PARTITIONS", 4),
            regions=regions,
            max_clock_skew_s=_float("MAX_CLOCK_SKEW_S", 300.0),
            max_backlog_s=_float("MAX_BACKLOG_S", 7 * 86400.0),
            dedup_uploads_per_vehicle=_int("DEDUP_UPLOADS_PER_VEHICLE", 64),
            trip_gap_s=_float("TRIP_GAP_S", 300.0),
            charge_gap_s=_float("CHARGE_GAP_S", 300.0),
            allowed_lateness_s=_float("ALLOWED_LATENESS_S", 120.0),
            worker_stall_s=_float("WORKER_STALL_S", 60.0),
            sink_batch_messages=_int("SINK_BATCH_MESSAGES", 2000),
            sink_flush_ms=_int("SINK_FLUSH_MS", 500),
            sink_instance=_env("SINK_INSTANCE", "0"),
            warehouse=_env("WAREHOUSE", "chdb"),
            metrics_port=_int("METRICS_PORT", 0),
            api_host=_env("API_HOST", "127.0.0.1"),
            api_port=_int("API_PORT", 0),
            api_signing_key=_env("API_SIGNING_KEY", ""),
            owner_token_ttl_s=_int("OWNER_TOKEN_TTL_S", 3600),
        )
    finally:
        if saved is not None:
            os.environ.clear()
            os.environ.update(saved)
    if settings.sink_batch_messages < 1:
        raise SettingsError("VTP_SINK_BATCH_MESSAGES must be at least 1")
    if settings.api_signing_key and len(settings.api_signing_key) < 32:
        raise SettingsError("VTP_API_SIGNING_KEY must be at least 32 characters (HS256)")
    return settings


def documented_variables() -> list[tuple[str, str]]:
    """(VTP_NAME, default) pairs, for `vtp config` and the README."""
    defaults = Settings()
    out = []
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        out.append((f"VTP_{f.name.upper()}", str(value)))
    return out

"""The one settings object, read from ``VTP_*`` environment variables.

Each setting is declared once below, with its default, what it means and whether it may
hold a secret; the parser follows the default's type. Every default runs locally: the
`vtp` commands find the broker ``vtp stack up`` started (deploy.broker), the warehouse is
the embedded ClickHouse engine (chdb) in the region's folder under the data directory.

A process serves one region (``VTP_REGION``, or ``--region`` on the command line); its
local state lives in ``<data_dir>/<region>``. Secrets (token keys, the pseudonym key)
are files in ``VTP_KEYS_DIR``, never environment variables: the embedded engine runs
inside the process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from schemas.codec import MAX_SAMPLES_PER_UPLOAD, MAX_UPLOAD_BYTES
from vtp.core.cluster_ddl import ClusterDDLError, check_cluster_name
from vtp.core.regions import REGIONS, UnknownRegion, known_region


def local_root(kind: str, xdg: str, fallback: str, here: Path = Path(__file__)) -> Path:
    """A source checkout keeps its state beside the code (`make` runs there); an installed
    vtp keeps it in the user's data or cache folder, never inside site-packages."""
    checkout = here.resolve().parents[2]
    if (checkout / "pyproject.toml").exists() and (checkout / "vtp" / "core").is_dir():
        return checkout / kind
    return Path(os.environ.get(xdg) or Path.home() / fallback) / "vtp"


class SettingsError(ValueError):
    """A ``VTP_*`` variable has a value that cannot be used."""


def mask_url_password(value: object) -> str:
    """The URL with everything between ``://`` and the last ``@`` of its authority shown
    as ``user:***`` (the password, however it is written, never appears)."""
    text = str(value)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    authority, slash, path = rest.partition("/")
    user_info, at, host = authority.rpartition("@")
    if not at:
        return text
    user = user_info.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


# librdkafka keys whose values say nothing secret; every other passthrough value is
# masked when shown (an allow-list: sasl.jaas.config, sasl.oauthbearer.config and keys
# that do not exist yet may all hold credentials).
SHOWN_KAFKA_KEYS = frozenset(
    {
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "ssl.ca.location",
        "ssl.certificate.location",
        "ssl.endpoint.identification.algorithm",
        "client.id",
        "acks",
        "compression.type",
        "linger.ms",
        "batch.size",
        "log_level",
        "debug",
        "socket.timeout.ms",
        "request.timeout.ms",
        "message.max.bytes",
        "enable.idempotence",
        "partitioner",
    }
)  # fmt: skip  -- a paragraph of names


def mask_secret_keys(value: object) -> str:
    """A passthrough mapping with every value masked but those of SHOWN_KAFKA_KEYS."""
    assert isinstance(value, dict)
    return json.dumps({k: (v if k in SHOWN_KAFKA_KEYS else "***") for k, v in value.items()})


def setting(
    default: Any,
    doc: str,
    *,
    secret: Callable[[object], str] | None = None,
    shown_default: str | None = None,
) -> Any:
    """One setting: its default, what it means, how to print it without its secrets, and
    how the documentation shows a default that depends on the machine."""
    meta = {"doc": doc, "secret": secret, "shown_default": shown_default}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, repr=False)
class Settings:
    data_dir: Path = setting(
        local_root("var", "XDG_DATA_HOME", ".local/share"),
        "local state; each region's in `<data_dir>/<region>`",
        shown_default="`var/` in the source checkout, else `$XDG_DATA_HOME/vtp`",
    )
    cache_dir: Path = setting(
        local_root(".cache", "XDG_CACHE_HOME", ".cache"),
        "Kafka jars",
        shown_default="`.cache/` in the source checkout, else `$XDG_CACHE_HOME/vtp`",
    )
    region: str = setting("", f"the region this process serves: one of {', '.join(REGIONS)}")
    kafka_bootstrap: str = setting(
        "", "host:port of the region's Kafka cluster; empty: the broker `vtp stack up` started"
    )
    kafka_version: str = setting("4.1.1", "Kafka jars the local launcher resolves")
    broker_port: int = setting(0, "port of the local broker; 0 picks a free loopback port")
    kafka_extra: dict[str, Any] = setting(
        {},
        "JSON of librdkafka keys (security, tuning) for every Kafka client; the worker's "
        "aiokafka gets the security.protocol, ssl.* and sasl.* ones translated",
        secret=mask_secret_keys,
    )
    kafka_sasl_password_file: str = setting(
        "",
        "file holding the SASL password (a mounted Secret); it becomes VTP_KAFKA_EXTRA's "
        "sasl.password, so the password is never in the environment",
    )
    topic_prefix: str = setting("vtp", "prefix of every topic, consumer group and app id")
    topic_partitions: int = setting(4, "partitions of every topic")
    topic_replication: int = setting(
        1, "replicas of every topic, the worker's own included; 3 on a cluster"
    )
    topic_min_insync: int = setting(
        1,
        "min.insync.replicas of every topic: replicas that must have a write before it is "
        "acknowledged (every producer waits for all in-sync ones); 2 on a cluster",
    )
    max_clock_skew_s: float = setting(
        300.0, "how far after the broker's receive time a timestamp may be"
    )
    max_backlog_s: float = setting(7 * 86400.0, "how old a sample may be relative to its upload")
    dedup_uploads_per_vehicle: int = setting(64, "upload ids the worker remembers per vehicle")
    max_upload_bytes: int = setting(
        MAX_UPLOAD_BYTES, "an upload larger than this is dead-lettered (too_large)"
    )
    max_samples_per_upload: int = setting(
        MAX_SAMPLES_PER_UPLOAD, "an upload with more samples is dead-lettered (too_many_samples)"
    )
    trip_gap_s: float = setting(300.0, "parked this long ends a trip")
    charge_gap_s: float = setting(300.0, "not charging this long ends a charging session")
    allowed_lateness_s: float = setting(120.0, "how far out of event-time order samples may arrive")
    vehicle_state_ttl_s: float = setting(
        30 * 86400.0,
        "the worker forgets a vehicle quiet this long (its sessions close final); 0 never; "
        "at least VTP_MAX_BACKLOG_S + VTP_MAX_CLOCK_SKEW_S",
    )
    changelog_compaction_lag_s: float = setting(
        86400.0, "longest a superseded worker state (e.g. an erased owner's) stays in Kafka"
    )
    state_checkpoint_s: float = setting(
        5.0,
        "how often the worker writes the vehicle states that changed (sooner once uploads "
        "stop for a fifth of it) and commits the uploads read; a restart reads up to this "
        "much again; 0 every batch",
    )
    worker_stall_s: float = setting(
        60.0, "a worker whose offsets did not move this long with work outstanding restarts; 0 off"
    )
    sink_batch_messages: int = setting(
        2000, "uploads per sink batch (a batch message counts its uploads; never split)"
    )
    sink_flush_ms: int = setting(500, "how long a partial sink batch waits")
    sink_aggregates_flush_ms: int = setting(
        2000, "how long a partial batch of aggregate records waits (fewer, larger inserts)"
    )
    sink_instance: str = setting("0", "names the sink process in its group (static membership)")
    sink_registry_wait_s: float = setting(
        30.0, "how long the sink waits for its registry copy to reach what the worker used"
    )
    warehouse: str = setting(
        "chdb", "`chdb` (embedded) or a ClickHouse server URL", secret=mask_url_password
    )
    warehouse_readers: int = setting(
        4,
        "warehouse clients that read side by side; as many write on a server "
        "(embedded: writes go one at a time)",
    )
    warehouse_cluster: str = setting(
        "",
        "ClickHouse server: the cluster (a `remote_servers` name) to create the tables on, "
        "each replicated per shard behind a Distributed table; empty: one server",
    )
    migration_lock_timeout_s: float = setting(
        900.0,
        "how long a process waits for another's schema migration; longer than "
        "VTP_MIGRATION_LOCK_STALE_S, so a waiter outlives a dead holder's lock",
    )
    migration_lock_stale_s: float = setting(
        600.0,
        "a migration lock whose holder made no progress this long is broken; more than the "
        "longest statement (on a cluster, distributed_ddl_task_timeout: 180 s by default)",
    )
    metrics_port: int = setting(0, "port of the Prometheus endpoint; 0 off")
    metrics_host: str = setting(
        "127.0.0.1", "where it listens: loopback unless opened (`0.0.0.0` in a pod)"
    )
    api_host: str = setting("127.0.0.1", "where `vtp serve` listens")
    api_port: int = setting(
        0, "its port; 0 picks a free one (written to `<data_dir>/<region>/serve.json`)"
    )
    pki_dir: str = setting(
        "",
        "folder of every region's edge certificates (`vtp pki`), each in `<pki_dir>/<region>`: "
        "`vehicle-ca.pem`, `edge-ca.pem`, `gateway.pem`/`.key`, `revoked.txt`; empty: `<data_dir>/<region>/pki`",
    )
    gateway_host: str = setting("127.0.0.1", "where `vtp gateway` listens for vehicles")
    gateway_port: int = setting(
        0, "its port; 0 picks a free one (written to `<data_dir>/<region>/gateway.json`)"
    )
    gateway_rate: float = setting(2.0, "uploads per second one vehicle may send, sustained")
    gateway_burst: int = setting(60, "uploads one vehicle may send at once (a reconnect's backlog)")
    gateway_inflight_mb: float = setting(
        64.0,
        "uploads waiting for Kafka's acknowledgement, in MiB; beyond it vehicles are told to "
        "retry later (kafka_backlog)",
    )
    gateway_max_connections: int = setting(
        10_000, "vehicle streams one gateway holds (about 80 KiB each, idle)"
    )
    gateway_revoked_reload_s: float = setting(
        5.0, "how often the gateway rereads `revoked.txt` (also on SIGHUP)"
    )
    keys_dir: str = setting(
        "",
        "folder of every region's keys, each in `<keys_dir>/<region>`; empty: `<data_dir>/<region>/keys`",
    )
    owner_token_ttl_s: int = setting(3600, "lifetime of owner tokens `vtp token` issues")
    export_page_rows: int = setting(50_000, "rows an export reads and sends at a time")
    owner_token_max_ttl_s: int = setting(
        86400, "longest owner token lifetime the API accepts (checked at every request)"
    )
    analyst_max_execution_s: float = setting(10.0, "an analyst query is cancelled after this")
    analyst_max_memory_mb: int = setting(1024, "memory one analyst query may use")
    analyst_max_rows_read: int = setting(200_000_000, "rows one analyst query may read")
    analyst_max_result_rows: int = setting(100_000, "rows one analyst query may return")
    analyst_max_result_mb: int = setting(64, "size of the result one analyst query may return")
    analyst_max_concurrent: int = setting(
        2, "analyst queries one `vtp serve` runs at once; more are refused (429)"
    )

    def __post_init__(self) -> None:
        if self.kafka_sasl_password_file:
            object.__setattr__(self, "kafka_extra", self._with_sasl_password())
        if self.region:
            try:
                object.__setattr__(self, "region", known_region(self.region))
            except UnknownRegion as exc:
                raise SettingsError(f"{exc} (VTP_REGION or --region)") from None
        if self.sink_batch_messages < 1:
            raise SettingsError("VTP_SINK_BATCH_MESSAGES must be at least 1")
        if not 1 <= self.topic_min_insync <= self.topic_replication:
            raise SettingsError(
                "VTP_TOPIC_MIN_INSYNC must be at least 1 and at most VTP_TOPIC_REPLICATION "
                "(a write could never be acknowledged)"
            )
        if self.warehouse_readers < 1:
            raise SettingsError("VTP_WAREHOUSE_READERS must be at least 1")
        if self.warehouse_cluster:
            self._check_cluster()
        if self.migration_lock_timeout_s < 0 or self.migration_lock_stale_s <= 0:
            raise SettingsError(
                "VTP_MIGRATION_LOCK_TIMEOUT_S must be 0 or more, VTP_MIGRATION_LOCK_STALE_S more than 0"
            )
        if self.topic_partitions < 1:
            raise SettingsError("VTP_TOPIC_PARTITIONS must be at least 1")
        if 0 < self.vehicle_state_ttl_s < self.max_backlog_s + self.max_clock_skew_s:
            # A vehicle back after its state expired must not send anything older than
            # what the expired state had released, or aggregation would take it in twice.
            raise SettingsError(
                "VTP_VEHICLE_STATE_TTL_S must be 0 or at least VTP_MAX_BACKLOG_S + "
                f"VTP_MAX_CLOCK_SKEW_S ({self.max_backlog_s + self.max_clock_skew_s:.0f} s)"
            )
        if self.state_checkpoint_s < 0:
            raise SettingsError("VTP_STATE_CHECKPOINT_S must be 0 or more")
        if 0 < self.worker_stall_s <= 2 * self.state_checkpoint_s:
            # Commits move once per checkpoint: a stall watch shorter than two would
            # restart a worker that is only waiting for its next one.
            raise SettingsError(
                "VTP_WORKER_STALL_S must be 0 or more than twice VTP_STATE_CHECKPOINT_S"
            )
        if self.gateway_rate <= 0 or self.gateway_burst < 1:
            raise SettingsError(
                "VTP_GATEWAY_RATE must be more than 0, VTP_GATEWAY_BURST at least 1"
            )
        if self.gateway_inflight_mb <= 0 or self.gateway_max_connections < 1:
            raise SettingsError(
                "VTP_GATEWAY_INFLIGHT_MB must be more than 0, VTP_GATEWAY_MAX_CONNECTIONS at least 1"
            )
        if self.changelog_compaction_lag_s <= 0:
            raise SettingsError("VTP_CHANGELOG_COMPACTION_LAG_S must be more than 0")

    def _check_cluster(self) -> None:
        try:
            check_cluster_name(self.warehouse_cluster)
        except ClusterDDLError as exc:
            raise SettingsError(f"VTP_WAREHOUSE_CLUSTER: {exc}") from None
        if not self.warehouse.startswith(("http://", "https://")):
            raise SettingsError(
                f"VTP_WAREHOUSE_CLUSTER={self.warehouse_cluster} needs a ClickHouse server: "
                f"VTP_WAREHOUSE={self.shown('warehouse')!r} has no cluster (the embedded engine "
                "is one process); set VTP_WAREHOUSE to a server URL or leave the cluster empty"
            )

    def _with_sasl_password(self) -> dict[str, Any]:
        try:
            password = Path(self.kafka_sasl_password_file).read_text().strip()
        except OSError as exc:
            raise SettingsError(
                f"VTP_KAFKA_SASL_PASSWORD_FILE={self.kafka_sasl_password_file}: {exc.strerror}"
            ) from None
        if not password:
            raise SettingsError(
                f"VTP_KAFKA_SASL_PASSWORD_FILE={self.kafka_sasl_password_file} is empty"
            )
        if self.kafka_extra.get("sasl.password", password) != password:  # same: a copy of these
            raise SettingsError(
                "VTP_KAFKA_SASL_PASSWORD_FILE and VTP_KAFKA_EXTRA's sasl.password both give "
                "a password: keep one"
            )
        return {**self.kafka_extra, "sasl.password": password}

    def for_region(self, region: str) -> Settings:
        """These settings for one region (``--region`` on the command line)."""
        return replace(self, region=region)

    def need_region(self) -> str:
        if not self.region:
            raise SettingsError(
                f"no region: set VTP_REGION or pass --region (one of {', '.join(REGIONS)})"
            )
        return self.region

    @property
    def home(self) -> Path:
        """This region's local state: broker, warehouse, worker state, logs, keys."""
        return self.data_dir / self.region if self.region else self.data_dir

    @property
    def keys_path(self) -> Path:
        """The region's own keys: never a folder two regions could share."""
        return Path(self.keys_dir) / self.need_region() if self.keys_dir else self.home / "keys"

    @property
    def pki_path(self) -> Path:
        """The region's edge certificates: never a folder two regions could share."""
        return Path(self.pki_dir) / self.need_region() if self.pki_dir else self.home / "pki"

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix, self.need_region())

    @property
    def warehouse_path(self) -> Path:
        return self.home / "warehouse"

    def bootstrap(self) -> str:
        """The region's broker (VTP_KAFKA_BOOTSTRAP; the CLI fills it in from the local
        stack's state file when `vtp stack up` started one)."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        where = f" --region {self.region}" if self.region else ""
        raise SettingsError(
            "no broker: set VTP_KAFKA_BOOTSTRAP=host:port or start one with "
            f"`vtp stack up{where}` (with the same VTP_DATA_DIR)"
        )

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def shown(self, name: str) -> str:
        """One setting's value as it may be printed or logged: secrets masked."""
        value = getattr(self, name)
        mask: Callable[[object], str] | None = _FIELDS[name].metadata["secret"]
        if mask is not None:
            return mask(value)
        return json.dumps(value) if isinstance(value, dict) else str(value)

    def __repr__(self) -> str:
        changed = (
            f"{f.name}={self.shown(f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(_DEFAULTS, f.name)
        )
        return f"Settings({', '.join(changed)})"


@dataclass(frozen=True)
class Topics:
    """A region's topics. The region is in every name, so a process pointed at the wrong
    cluster finds nothing of its own instead of another region's data."""

    prefix: str
    region: str

    def _name(self, what: str) -> str:
        return f"{self.prefix}.{self.region}.{what}"

    @property
    def uploads(self) -> str:
        return self._name("uploads")

    @property
    def vehicles(self) -> str:
        return self._name("vehicles")

    @property
    def validated(self) -> str:
        return self._name("validated")

    @property
    def control(self) -> str:
        """Notices for the worker's session state (an owner's erasure), keyed by VIN."""
        return self._name("control")

    @property
    def aggregates(self) -> str:
        return self._name("aggregates")

    @property
    def deadletter(self) -> str:
        return self._name("deadletter")

    @property
    def quarantine(self) -> str:
        return self._name("quarantine")

    @property
    def worker_app(self) -> str:
        """The Faust app id, which is also the worker's consumer group."""
        return f"{self.prefix}-{self.region}-worker"

    @property
    def sink_group(self) -> str:
        return f"{self.prefix}-{self.region}-sink"


def _parse(name: str, raw: str, default: Any) -> Any:
    env = f"VTP_{name.upper()}"
    if isinstance(default, Path):
        return Path(raw).resolve()
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{env}={raw!r} is not a whole number") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{env}={raw!r} is not a number") from None
    if isinstance(default, dict):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{env} must be a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise SettingsError(f"{env} must be a JSON object, got {type(value).__name__}")
        return value
    return raw


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default: the process environment); nothing is written."""
    env = os.environ if environ is None else environ
    defaults = Settings()
    values = {}
    for f in fields(Settings):
        raw = env.get(f"VTP_{f.name.upper()}")
        if raw is not None:
            values[f.name] = _parse(f.name, raw, getattr(defaults, f.name))
    return Settings(**values)


def as_environment(settings: Settings) -> dict[str, str]:
    """Every setting as the ``VTP_*`` variables that reproduce it in a child process."""
    out = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        out[f"VTP_{f.name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    return out


@dataclass(frozen=True)
class SettingDoc:
    variable: str
    type: str
    default: str
    doc: str
    secret: bool


_TYPE_NAMES = {
    "Path": "path",
    "str": "text",
    "int": "integer",
    "float": "number",
    "dict[str, Any]": "JSON object",
}


def documented_settings() -> list[SettingDoc]:
    """Every setting as `vtp config` and the README's table show it."""
    return [
        SettingDoc(
            f"VTP_{f.name.upper()}",
            _TYPE_NAMES[str(f.type)],
            f.metadata["shown_default"] or _DEFAULTS.shown(f.name),
            f.metadata["doc"],
            f.metadata["secret"] is not None,
        )
        for f in fields(Settings)
    ]


def settings_table() -> str:
    """The README's configuration table (`vtp config --markdown`)."""
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for d in documented_settings():
        default = (
            d.default if d.default.startswith("`") else f"`{d.default}`" if d.default else "(empty)"
        )
        secret = " Secret: `vtp config` masks it." if d.secret else ""
        lines.append(f"| `{d.variable}` | {d.type} | {default} | {d.doc}{secret} |")
    return "\n".join(lines) + "\n"


_FIELDS = {f.name: f for f in fields(Settings)}
_DEFAULTS = Settings()

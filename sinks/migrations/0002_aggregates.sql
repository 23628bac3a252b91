-- Trips, charges and daily summaries, in the same per-owner layout as samples.
-- ReplacingMergeTree(version): a replayed or updated record replaces the older row of
-- the same key; readers use FINAL, which on one owner's slice is cheap.
CREATE TABLE IF NOT EXISTS trips
(
    owner_id          String,
    vin               String,
    start_time        DateTime64(3, 'UTC'),
    end_time          DateTime64(3, 'UTC'),
    duration_s        Float64,
    start_lat         Nullable(Float64),
    start_lon         Nullable(Float64),
    end_lat           Nullable(Float64),
    end_lon           Nullable(Float64),
    start_odometer    Nullable(Float64),
    end_odometer      Nullable(Float64),
    distance_km       Float64,
    avg_speed_kmh     Float64,
    max_speed_kmh     Float64,
    start_soc         Nullable(Float64),
    end_soc           Nullable(Float64),
    soc_used          Nullable(Float64),
    energy_kwh        Nullable(Float64),
    outside_temp_avg  Nullable(Float64),
    region            LowCardinality(String),
    version           UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(start_time)
ORDER BY (owner_id, vin, start_time)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS charges
(
    owner_id           String,
    vin                String,
    start_time         DateTime64(3, 'UTC'),
    end_time           DateTime64(3, 'UTC'),
    duration_s         Float64,
    lat                Nullable(Float64),
    lon                Nullable(Float64),
    start_soc          Nullable(Float64),
    end_soc            Nullable(Float64),
    energy_added_kwh   Nullable(Float64),
    energy_metered_kwh Float64,
    peak_power_kw      Float64,
    avg_power_kw       Float64,
    mode               LowCardinality(Nullable(String)),
    region             LowCardinality(String),
    version            UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(start_time)
ORDER BY (owner_id, vin, start_time)
SETTINGS non_replicated_deduplication_window = 10000;

-- One row per vehicle and local day (the vehicle's time zone); final once the next
-- day's data has been released, provisional before.
CREATE TABLE IF NOT EXISTS daily_summaries
(
    owner_id              String,
    vin                   String,
    date                  Date,
    time_zone             LowCardinality(String),
    samples               UInt32,
    distance_km           Float64,
    driving_s             Float64,
    energy_used_kwh       Nullable(Float64),
    energy_charged_kwh    Nullable(Float64),
    idle_drain_kwh        Nullable(Float64),
    parked_s              Float64,
    trips                 UInt32,
    charges               UInt32,
    efficiency_wh_per_km  Nullable(Float64),
    final                 Bool,
    region                LowCardinality(String),
    version               UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(date)
ORDER BY (owner_id, vin, date)
SETTINGS non_replicated_deduplication_window = 10000;

-- The trip and the charge each vehicle has open right now (active = 0 when none):
-- one slot per vehicle and kind, so a provisional session never outlives itself.
CREATE TABLE IF NOT EXISTS open_sessions
(
    owner_id     String,
    vin          String,
    kind         LowCardinality(String),
    active       Bool,
    start_time   Nullable(DateTime64(3, 'UTC')),
    end_time     Nullable(DateTime64(3, 'UTC')),
    distance_km  Nullable(Float64),
    energy_kwh   Nullable(Float64),
    start_soc    Nullable(Float64),
    end_soc      Nullable(Float64),
    record       String,
    region       LowCardinality(String),
    version      UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (owner_id, vin, kind)
SETTINGS non_replicated_deduplication_window = 10000;

-- Samples: one row per sample. An owner's rows are one contiguous slice of each
-- monthly partition: the primary key starts with owner_id, then vin and time, so
-- reading, exporting or erasing an owner touches only that owner's granules.
-- Partitions stay bounded (one per month), never one per owner.
CREATE TABLE IF NOT EXISTS samples
(
    owner_id            String,
    vin                 String,
    event_time          DateTime64(3, 'UTC'),
    seq                 UInt64,
    upload_id           String,
    speed               Nullable(Float32),
    latitude            Nullable(Float64),
    longitude           Nullable(Float64),
    heading             Nullable(Float32),
    odometer            Nullable(Float64),
    soc                 Nullable(Float32),
    is_charging         Nullable(Bool),
    charge_power        Nullable(Float32),
    charge_mode         LowCardinality(Nullable(String)),
    battery_temperature Nullable(Float32),
    outside_temperature Nullable(Float32),
    gear                LowCardinality(Nullable(String)),
    dtcs                Array(String),
    cabin_temperature   Nullable(Float32),
    region              LowCardinality(String),
    schema_version      UInt8,
    received_at         DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (owner_id, vin, event_time, seq)
SETTINGS non_replicated_deduplication_window = 10000;

-- Uploads: one row per stored upload, written after its samples, so a row here
-- means the upload is complete. It carries both the raw message it came from and
-- the validated message it was read from: the sink tells a replay from a resend
-- with them.
CREATE TABLE IF NOT EXISTS uploads
(
    owner_id          String,
    vin               String,
    upload_id         String,
    sent_at           DateTime64(3, 'UTC'),
    received_at       DateTime64(3, 'UTC'),
    first_event_time  DateTime64(3, 'UTC'),
    last_event_time   DateTime64(3, 'UTC'),
    sample_count      UInt32,
    gateway_firmware  String,
    schema_version    UInt8,
    region            LowCardinality(String),
    raw_source        String,
    topic             LowCardinality(String),
    partition         UInt32,
    offset            UInt64,
    INDEX upload_id_bloom upload_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(sent_at)
ORDER BY (owner_id, vin, sent_at, upload_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- The sink's batch log: a batch's offset range is written here before the batch
-- is inserted, so after a crash the same range is cut again and its inserts carry
-- the same deduplication tokens.
CREATE TABLE IF NOT EXISTS sink_batches
(
    topic        String,
    partition    UInt32,
    first_offset UInt64,
    last_offset  UInt64,
    messages     UInt32,
    recorded_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY (topic, partition, first_offset)
SETTINGS non_replicated_deduplication_window = 10000;

-- Owner access: grants to third parties, the access log, erasure requests.
-- All keyed by owner_id first, like the data, so erasing an owner is one slice each.

-- A grant is revoked by inserting a newer version with revoked_at set; read with FINAL.
CREATE TABLE IF NOT EXISTS grants
(
    owner_id    String,
    grant_id    String,
    party       String,
    scopes      Array(LowCardinality(String)),
    created_at  DateTime64(3, 'UTC'),
    expires_at  DateTime64(3, 'UTC'),
    revoked_at  Nullable(DateTime64(3, 'UTC')),
    version     UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (owner_id, grant_id);

-- Every read, export, grant change and erasure: who (the owner or a grant's party),
-- what, when, how many rows, and the HTTP status it ended with.
CREATE TABLE IF NOT EXISTS audit_log
(
    owner_id    String,
    at          DateTime64(3, 'UTC'),
    request_id  String,
    actor       String,
    grant_id    String,
    action      LowCardinality(String),
    resource    String,
    detail      String,
    rows        UInt64,
    status      UInt16
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (owner_id, at, request_id);

-- Erasure requests outlive the data: the sink drops any record of the owner from
-- before requested_at (a replayed message must not bring erased data back).
CREATE TABLE IF NOT EXISTS erasures
(
    owner_id      String,
    erasure_id    String,
    requested_at  DateTime64(3, 'UTC'),
    completed_at  Nullable(DateTime64(3, 'UTC')),
    rows_deleted  String,
    version       UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (owner_id, erasure_id);

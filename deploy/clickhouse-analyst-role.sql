-- For a ClickHouse server (not the embedded engine, which has no users): a role that
-- reads the pseudonymised analyst_* views of one region's database and nothing else.
-- Apply as an admin after `vtp serve`/`vtp sink` created the tables, replacing vtp_eu
-- with the region's database:
--   clickhouse-client --multiquery < deploy/clickhouse-analyst-role.sql
-- The views run with their definer's rights, so analysts need no grant on the tables.
-- Not exercised by the test suite here (no ClickHouse server on these machines).
CREATE ROLE IF NOT EXISTS vtp_analyst;
ALTER TABLE vtp_eu.analyst_samples MODIFY SQL SECURITY DEFINER;
ALTER TABLE vtp_eu.analyst_trips MODIFY SQL SECURITY DEFINER;
ALTER TABLE vtp_eu.analyst_charges MODIFY SQL SECURITY DEFINER;
ALTER TABLE vtp_eu.analyst_daily_summaries MODIFY SQL SECURITY DEFINER;
GRANT SELECT ON vtp_eu.analyst_samples TO vtp_analyst;
GRANT SELECT ON vtp_eu.analyst_trips TO vtp_analyst;
GRANT SELECT ON vtp_eu.analyst_charges TO vtp_analyst;
GRANT SELECT ON vtp_eu.analyst_daily_summaries TO vtp_analyst;
-- CREATE USER alice IDENTIFIED WITH sha256_password BY '...' DEFAULT ROLE vtp_analyst;

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
-- The limits `vtp sql` and the owner API put on every analyst query (AnalystLimits'
-- defaults), for those who reach the views directly (Grafana's warehouse datasource,
-- clickhouse-client): read-only, and none of the limits can be changed by the user.
CREATE SETTINGS PROFILE IF NOT EXISTS vtp_analyst_limits SETTINGS readonly = 2 CONST, max_execution_time = 10 CONST, timeout_overflow_mode = 'throw' CONST, max_memory_usage = 1073741824 CONST, max_rows_to_read = 200000000 CONST, read_overflow_mode = 'throw' CONST, max_result_rows = 100000 CONST, result_overflow_mode = 'throw' CONST, max_result_bytes = 67108864 CONST, allow_introspection_functions = 0 CONST TO vtp_analyst;
-- CREATE USER alice IDENTIFIED WITH sha256_password BY '...' DEFAULT ROLE vtp_analyst;

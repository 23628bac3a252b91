-- The sink's batch log only matters while Kafka could still hand the same range again
-- (retention, seven days by default); a month of it is kept, not every batch forever.
ALTER TABLE sink_batches MODIFY TTL toDateTime(recorded_at) + INTERVAL 30 DAY;

-- An erasure's time is what keeps replayed or late data of the owner out; that matters
-- while Kafka could still hand such data back (topic retention, 7 days by default; a
-- sample older than VTP_MAX_BACKLOG_S is refused anyway). Its record is kept a year, for
-- the owner and the operator to see, then it goes too. Keep topic retention below that.
ALTER TABLE erasures MODIFY TTL toDateTime(requested_at) + INTERVAL 365 DAY;

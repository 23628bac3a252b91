-- When the sink stored each upload (the insert's time): with received_at (the broker's
-- append time of the raw upload) it says how long an upload took to become queryable,
-- which `make bench` reports and an operator can watch. Bookkeeping: no route, export
-- or analyst view shows it (owner_api/scopes.py lists it as internal).
ALTER TABLE uploads ADD COLUMN IF NOT EXISTS stored_at DateTime64(3, 'UTC') DEFAULT now64(3);

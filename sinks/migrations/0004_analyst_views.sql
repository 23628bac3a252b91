-- Views for analysts: owners and vehicles only as keyed pseudonyms, positions rounded
-- to 0.01 degree (about 1 km), no upload ids, no grants, no access log. The key is
-- random per warehouse and never leaves it; only these analyst_* views may be queried
-- by `vtp sql` (see owner_api/analyst.py). Erased rows vanish from the views with the
-- rows themselves.
CREATE TABLE IF NOT EXISTS pseudonym_key (key String) ENGINE = MergeTree ORDER BY tuple();

INSERT INTO pseudonym_key
SELECT lower(hex(randomString(32))) FROM numbers(1) WHERE (SELECT count() FROM pseudonym_key) = 0;

CREATE VIEW IF NOT EXISTS analyst_samples AS
SELECT
    substring(lower(hex(SHA256(concat((SELECT any(key) FROM pseudonym_key), ':owner:', owner_id)))), 1, 16) AS owner_ref,
    substring(lower(hex(SHA256(concat((SELECT any(key) FROM pseudonym_key), ':vin:', vin)))), 1, 16) AS vehicle_ref,
    region, event_time, speed,
    round(latitude, 2) AS latitude, round(longitude, 2) AS longitude,
    soc, is_charging, charge_power, charge_mode, battery_temperature, outside_temperature,
    gear, length(dtcs) AS dtc_count
FROM samples;

CREATE VIEW IF NOT EXISTS analyst_trips AS
SELECT
    substring(lower(hex(SHA256(concat((SELECT any(key) FROM pseudonym_key), ':owner:', owner_id)))), 1, 16) AS owner_ref,
    substring(lower(hex(SHA256(concat((SELECT any(key) FROM pseudonym_key), ':vin:', vin)))), 1, 16) AS vehicle_ref,
    region, start_time, end_time, duration_s,
    round(start_lat, 2) AS start_lat, round(start_lon, 2) AS start_lon,
    round(end_lat, 2) AS end_lat, round(end_lon, 2) AS end_lon,
    distance_km, avg_speed_kmh, max_speed_kmh, soc_used, energy_kwh, outside_temp_avg
FROM trips FINAL;

CREATE VIEW IF NOT EXISTS analyst_charges AS
SELECT
    substring(lower(hex(SHA256(concat((SELECT any(key) FROM pseudonym_key), ':owner:', owner_id)))), 1, 16) AS owner_ref,
    substring(lower(hex(SHA256(concat((SELECT any(key) FROM pseudonym_key), ':vin:', vin)))), 1, 16) AS vehicle_ref,
    region, start_time, end_time, duration_s, round(lat, 2) AS lat, round(lon, 2) AS lon,
    start_soc, end_soc, energy_added_kwh, energy_metered_kwh, peak_power_kw, avg_power_kw, mode
FROM charges FINAL;

CREATE VIEW IF NOT EXISTS analyst_daily_summaries AS
SELECT
    substring(lower(hex(SHA256(concat((SELECT any(key) FROM pseudonym_key), ':owner:', owner_id)))), 1, 16) AS owner_ref,
    substring(lower(hex(SHA256(concat((SELECT any(key) FROM pseudonym_key), ':vin:', vin)))), 1, 16) AS vehicle_ref,
    region, date, time_zone, samples, distance_km, driving_s, energy_used_kwh,
    energy_charged_kwh, idle_drain_kwh, parked_s, trips, charges, efficiency_wh_per_km, final
FROM daily_summaries FINAL;

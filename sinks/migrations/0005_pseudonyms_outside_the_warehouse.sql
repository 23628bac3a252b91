-- The pseudonym key leaves the warehouse: nothing the engine can read may let anyone
-- recompute a pseudonym. The sink computes each (owner, vehicle) pair's pseudonyms in
-- Python with the key from the region's keys folder (vtp.core.keys) and stores only the
-- results here; the analyst views join them. Analysts never read this table itself.
DROP VIEW IF EXISTS analyst_samples;
DROP VIEW IF EXISTS analyst_trips;
DROP VIEW IF EXISTS analyst_charges;
DROP VIEW IF EXISTS analyst_daily_summaries;
DROP TABLE IF EXISTS pseudonym_key SYNC;

CREATE TABLE IF NOT EXISTS pseudonyms
(
    owner_id     String,
    vin          String,
    owner_ref    String,
    vehicle_ref  String
)
ENGINE = ReplacingMergeTree
ORDER BY (owner_id, vin);

-- One row per pair whatever the merges have done (the table is ReplacingMergeTree).
CREATE VIEW IF NOT EXISTS pseudonym_refs AS
SELECT owner_id, vin, any(owner_ref) AS owner_ref, any(vehicle_ref) AS vehicle_ref
FROM pseudonyms GROUP BY owner_id, vin;

CREATE VIEW IF NOT EXISTS analyst_samples AS
SELECT
    p.owner_ref AS owner_ref, p.vehicle_ref AS vehicle_ref, s.region AS region,
    s.event_time AS event_time, s.speed AS speed,
    round(s.latitude, 2) AS latitude, round(s.longitude, 2) AS longitude,
    s.soc AS soc, s.is_charging AS is_charging, s.charge_power AS charge_power,
    s.charge_mode AS charge_mode, s.battery_temperature AS battery_temperature,
    s.outside_temperature AS outside_temperature, s.gear AS gear, length(s.dtcs) AS dtc_count
FROM samples AS s
INNER JOIN pseudonym_refs AS p
    ON p.owner_id = s.owner_id AND p.vin = s.vin;

CREATE VIEW IF NOT EXISTS analyst_trips AS
SELECT
    p.owner_ref AS owner_ref, p.vehicle_ref AS vehicle_ref, t.region AS region,
    t.start_time AS start_time, t.end_time AS end_time, t.duration_s AS duration_s,
    round(t.start_lat, 2) AS start_lat, round(t.start_lon, 2) AS start_lon,
    round(t.end_lat, 2) AS end_lat, round(t.end_lon, 2) AS end_lon,
    t.distance_km AS distance_km, t.avg_speed_kmh AS avg_speed_kmh,
    t.max_speed_kmh AS max_speed_kmh, t.soc_used AS soc_used, t.energy_kwh AS energy_kwh,
    t.outside_temp_avg AS outside_temp_avg
FROM trips AS t FINAL
INNER JOIN pseudonym_refs AS p
    ON p.owner_id = t.owner_id AND p.vin = t.vin;

CREATE VIEW IF NOT EXISTS analyst_charges AS
SELECT
    p.owner_ref AS owner_ref, p.vehicle_ref AS vehicle_ref, c.region AS region,
    c.start_time AS start_time, c.end_time AS end_time, c.duration_s AS duration_s,
    round(c.lat, 2) AS lat, round(c.lon, 2) AS lon, c.start_soc AS start_soc,
    c.end_soc AS end_soc, c.energy_added_kwh AS energy_added_kwh,
    c.energy_metered_kwh AS energy_metered_kwh, c.peak_power_kw AS peak_power_kw,
    c.avg_power_kw AS avg_power_kw, c.mode AS mode
FROM charges AS c FINAL
INNER JOIN pseudonym_refs AS p
    ON p.owner_id = c.owner_id AND p.vin = c.vin;

CREATE VIEW IF NOT EXISTS analyst_daily_summaries AS
SELECT
    p.owner_ref AS owner_ref, p.vehicle_ref AS vehicle_ref, d.region AS region,
    d.date AS date, d.time_zone AS time_zone, d.samples AS samples,
    d.distance_km AS distance_km, d.driving_s AS driving_s,
    d.energy_used_kwh AS energy_used_kwh, d.energy_charged_kwh AS energy_charged_kwh,
    d.idle_drain_kwh AS idle_drain_kwh, d.parked_s AS parked_s, d.trips AS trips,
    d.charges AS charges, d.efficiency_wh_per_km AS efficiency_wh_per_km, d.final AS final
FROM daily_summaries AS d FINAL
INNER JOIN pseudonym_refs AS p
    ON p.owner_id = d.owner_id AND p.vin = d.vin;

"""vtp: vehicle telemetry pipeline."""

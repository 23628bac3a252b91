"""Vehicle registry records: encode for the compacted topic, decode into Registration."""

from __future__ import annotations

from schemas import FramingError, SchemaStore, default_store
from stream_jobs.validate import Registration


def encode_registration(registration: dict, store: SchemaStore | None = None) -> bytes:
    store = store or default_store()
    return store.encode(registration, store.get("VehicleRegistration"))


def decode_registration(data: bytes, store: SchemaStore | None = None) -> Registration:
    """Raises FramingError for bytes that are not a VehicleRegistration."""
    store = store or default_store()
    record, writer = store.decode(data)
    if writer.name != "vtp.registry.VehicleRegistration":
        raise FramingError("unexpected_schema", f"{writer.name} is not a VehicleRegistration")
    return Registration(
        vin=record["vin"],
        owner_id=record["owner_id"],
        region=record["region"].lower(),
        model=record.get("model", ""),
        battery_capacity_kwh=record.get("battery_capacity_kwh"),
        time_zone=record.get("time_zone", "UTC"),
    )

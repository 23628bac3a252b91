"""Avro schemas, their fingerprints, and single-object framing.

Public names: SchemaStore, Schema, FramingError, default_store.
"""

from schemas.codec import FramingError, Schema, SchemaStore, default_store

__all__ = ["FramingError", "Schema", "SchemaStore", "default_store"]

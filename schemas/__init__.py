"""Avro schemas, their fingerprints, and single-object framing.

Public names: SchemaStore, Schema, FramingError, default_store.
"""

from schemas.codec import (
    MAX_ID_CHARS,
    MAX_SAMPLES_PER_UPLOAD,
    MAX_UPLOAD_BYTES,
    FramingError,
    Schema,
    SchemaStore,
    default_store,
)

__all__ = [
    "MAX_ID_CHARS",
    "MAX_SAMPLES_PER_UPLOAD",
    "MAX_UPLOAD_BYTES",
    "FramingError",
    "Schema",
    "SchemaStore",
    "default_store",
]

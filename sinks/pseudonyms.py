"""Pseudonyms for analysts, computed outside the warehouse.

An owner's and a vehicle's pseudonym are keyed hashes (HMAC-SHA256, 16 hex digits)
with the region's pseudonym key, which lives in the keys folder (vtp.core.keys) and never in
the warehouse: no query can recompute a pseudonym from an id it knows. The sink stores
each new (owner, vehicle) pair's pseudonyms next to the data; the analyst views join
them; an erasure removes them with the owner's rows.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import pyarrow as pa

from vtp.core.warehouse import Warehouse, rows

SCHEMA = pa.schema(
    [
        ("owner_id", pa.string()),
        ("vin", pa.string()),
        ("owner_ref", pa.string()),
        ("vehicle_ref", pa.string()),
    ]
)


def pseudonym(key: bytes, kind: str, identifier: str) -> str:
    return hmac.new(key, f"{kind}:{identifier}".encode(), hashlib.sha256).hexdigest()[:16]


def table(key: bytes, pairs: Iterable[tuple[str, str]]) -> pa.Table:
    pairs = sorted(set(pairs))
    return pa.Table.from_pylist(
        [
            {
                "owner_id": o,
                "vin": v,
                "owner_ref": pseudonym(key, "owner", o),
                "vehicle_ref": pseudonym(key, "vin", v),
            }
            for o, v in pairs
        ],
        schema=SCHEMA,
    )


def record_pairs(warehouse: Warehouse, key: bytes, pairs: set[tuple[str, str]]) -> int:
    """Store the pseudonyms of the pairs that have none yet; returns how many were new."""
    if not pairs:
        return 0
    known = {
        (o, v)
        for o, v in rows(
            warehouse.query(
                "SELECT owner_id, vin FROM pseudonyms WHERE owner_id IN {o:Array(String)} "
                "AND vin IN {v:Array(String)}",
                {"o": sorted({o for o, _ in pairs}), "v": sorted({v for _, v in pairs})},
            )
        )
    }
    missing = pairs - known
    warehouse.insert_arrow("pseudonyms", table(key, missing))
    return len(missing)


def backfill(warehouse: Warehouse, key: bytes) -> int:
    """Pseudonyms for pairs stored before there were any (an older warehouse)."""
    found = rows(
        warehouse.query(
            "SELECT DISTINCT owner_id, vin FROM (SELECT owner_id, vin FROM uploads UNION ALL "
            "SELECT owner_id, vin FROM trips UNION ALL SELECT owner_id, vin FROM charges "
            "UNION ALL SELECT owner_id, vin FROM daily_summaries) WHERE (owner_id, vin) NOT IN "
            "(SELECT owner_id, vin FROM pseudonyms)"
        )
    )
    warehouse.insert_arrow("pseudonyms", table(key, [(o, v) for o, v in found]))
    return len(found)

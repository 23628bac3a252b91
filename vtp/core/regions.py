"""The regions vtp serves: a closed list, opened one region at a time on purpose.

A region is a deployment unit: its own Kafka cluster, topics, worker, sink, warehouse,
owner API and keys. Adding one here is the deliberate act that opens it; every process
refuses a region that is not listed.
"""

from __future__ import annotations

REGIONS: dict[str, str] = {
    "cn": "China: vehicle data stays in the country (PIPL, automobile data provisions 2021)",
    "eu": "European Union: GDPR and the Data Act",
}


class UnknownRegion(ValueError):
    """A region name that is not one of REGIONS."""


def known_region(name: str) -> str:
    """The region's canonical name, or UnknownRegion naming the ones that exist."""
    region = name.strip().lower()
    if region not in REGIONS:
        raise UnknownRegion(f"region {name!r} is not one of {', '.join(REGIONS)}")
    return region

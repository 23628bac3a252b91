"""The gateway's decisions that need no socket: who a certificate names, who may open a
stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from producers.edge import Edge, certificate_identity
from vtp.core.settings import load_settings

VIN = "WVWZZZ1JZXW000001"


def peercert(*common_names: str, serial: str = "0A1B") -> dict:
    subject = [(("organizationName", "vtp development"),)]
    subject += [(("commonName", cn),) for cn in common_names]
    return {"subject": tuple(subject), "serialNumber": serial}


def test_a_certificate_names_its_vin_and_serial():
    assert certificate_identity(peercert(VIN)) == (VIN, 0x0A1B)


@pytest.mark.parametrize(
    "cert",
    [
        None,
        {},
        peercert("vtp dev gateway eu"),  # a server certificate, say
        peercert(VIN, VIN),  # two names: which one?
        peercert(VIN.lower()),
        peercert(VIN, serial="not hex"),
    ],
)
def test_a_certificate_that_names_no_single_vin_names_no_vehicle(cert):
    assert certificate_identity(cert) is None


class NoKafka:
    """Edge.admit never produces; anything else would be a bug here."""

    def __getattr__(self, name):
        raise AssertionError(f"admit used the producer's {name}")


def test_revoked_serials_and_a_full_gateway_are_refused_a_known_vehicle_replaces_itself():
    settings = load_settings({}).with_(region="eu", gateway_max_connections=1)
    edge = Edge(settings, NoKafka())  # type: ignore[arg-type]
    edge.set_revoked(frozenset({7}))
    assert edge.admit(VIN, 7) == "revoked"
    assert edge.admit(VIN, 8) is None
    edge.connections[VIN] = object()  # type: ignore[assignment]
    assert edge.admit("WVWZZZ1JZXW000002", 9) == "too_many_connections"
    assert edge.admit(VIN, 8) is None  # its newer stream replaces the older


class GoneVehicle:
    """A WebSocket whose vehicle left without reading its answers."""

    closed = False

    async def send_str(self, text: str) -> None:
        raise ConnectionResetError("the vehicle is gone")

    async def receive(self) -> None:
        await asyncio.Event().wait()  # nothing ever comes

    async def close(self, **_: object) -> None:
        self.closed = True


def test_a_stream_owing_answers_to_a_vehicle_that_left_is_let_go():
    from producers.edge import Connection
    from producers.gateway import UNANSWERED_PER_STREAM, Gateway
    from producers.pki import RegionPKI

    async def scenario() -> bool:
        settings = load_settings({}).with_(region="eu")
        edge = Edge(settings, NoKafka())  # type: ignore[arg-type]
        gateway = Gateway(settings, edge, RegionPKI(Path("unused"), ()))
        conn = Connection(VIN, 1, GoneVehicle())  # type: ignore[arg-type]
        conn.unanswered = UNANSWERED_PER_STREAM  # the reader waits for room
        conn.answer("an answer it will never read")
        writer = asyncio.create_task(gateway.write_answers(conn))
        await asyncio.wait_for(gateway.read_uploads(conn), 5)  # ends: does not hang
        await writer
        return conn.closed

    assert asyncio.run(scenario())

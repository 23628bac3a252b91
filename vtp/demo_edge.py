"""The vehicle edge's part in `vtp demo`: vehicles' certificates and uplinks, one that
loses its gateway for a while, and what a forged certificate hears."""

from __future__ import annotations

import re
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from producers import edge_wire
from producers.pki import issue_vehicle
from producers.simulator import Vehicle, simulate
from producers.uplink import UplinkReport, VehicleCredentials, VehicleUplink
from schemas import default_store
from vtp.core.settings import Settings


def vehicle_credentials(settings: Settings, vin: str) -> VehicleCredentials:
    """The vehicle's certificate from its region's vehicle CA (`vtp pki issue`), and the
    edge CA it checks the gateway's certificate against."""
    identity = issue_vehicle(settings.pki_path, vin)
    return VehicleCredentials(
        identity.cert_path, identity.key_path, settings.pki_path / "edge-ca.pem"
    )


def busiest(
    vehicles: list[Vehicle], seed: int, start_ms: int, minutes: float, window: tuple[int, int]
) -> Vehicle:
    """The vehicle that sends the most uploads within ``window``: the clearest catch-up.
    (A vehicle's simulation depends on the seed and its VIN only.)"""

    def uploads_in(v: Vehicle) -> int:
        uploads = simulate([v], seed=seed, start_ms=start_ms, duration_s=minutes * 60)
        return sum(window[0] <= u["sent_at_ms"] < window[1] for u in uploads)

    return max(vehicles, key=uploads_in)


def _total(reports: list[UplinkReport]) -> UplinkReport:
    total = UplinkReport()
    for r in reports:
        total.acknowledged += r.acknowledged
        total.refused += r.refused
        for reason, n in r.retried.items():
            total.retried[reason] = total.retried.get(reason, 0) + n
        total.connects += r.connects
        total.connect_failures += r.connect_failures
        total.last_error = r.last_error or total.last_error
    return total


def close_uplinks(
    uplinks: dict[str, VehicleUplink | OutOfReach], timeout: float
) -> tuple[UplinkReport, int]:
    """Waits until every spool is empty, then closes the uplinks: what they heard back
    from the gateways, and the uploads still waiting."""
    deadline = time.monotonic() + timeout
    for link in uplinks.values():
        link.wait_acknowledged(max(0.0, deadline - time.monotonic()))
    waiting = sum(link.pending() for link in uplinks.values())
    with ThreadPoolExecutor(len(uplinks) or 1) as pool:  # each takes a moment to hang up
        return _total(list(pool.map(lambda link: link.close(), uplinks.values()))), waiting


class OutOfReach:
    """A vehicle that loses its gateway while it sends its uploads from ``lost_ms`` to
    ``back_ms`` (their sent-at times), as in a car park or a tunnel: meanwhile its uplink
    leads to a port that refuses connections and its uploads wait in its spool; then an
    uplink to the gateway on the same spool (the SDK after a restart) catches up, oldest
    first. It sends through the same calls as a VehicleUplink."""

    def __init__(
        self, url: str, credentials: VehicleCredentials, folder: Path, lost_ms: int, back_ms: int
    ):
        self.url, self.credentials, self.folder = url, credentials, folder
        self.lost_ms, self.back_ms = lost_ms, back_ms
        self.uplink = VehicleUplink(url, credentials, folder)
        self.phase = "reachable"  # then "lost", "back", "closed"
        self.reports: list[UplinkReport] = []
        self.sent: list[str] = []  # every upload id, in the order sent
        self.spooled: list[str] = []  # those sent out of reach
        self.spooled_samples = 0
        self.spooled_span = (0, 0)  # event times (ms) of their first and last sample
        self.refusing: socket.socket | None = None
        self.offline = UplinkReport()
        self.caught_up_s: float | None = None
        self.acknowledged_after = 0
        self._store = default_store()

    def send_encoded(self, upload_id: str, value: bytes) -> int:
        upload, _ = self._store.decode(value)
        if self.phase == "reachable" and upload["sent_at_ms"] >= self.lost_ms:
            self._lose()
        elif self.phase == "lost" and upload["sent_at_ms"] >= self.back_ms:
            self._reconnect()
        if self.phase == "lost":
            samples = upload["samples"]
            first = self.spooled_span[0] if self.spooled else samples[0]["event_time_ms"]
            self.spooled_span = (first, samples[-1]["event_time_ms"])
            self.spooled.append(upload_id)
            self.spooled_samples += len(samples)
        self.sent.append(upload_id)
        return self.uplink.send_encoded(upload_id, value)

    def _lose(self) -> None:
        self.uplink.wait_acknowledged(30)  # nothing in flight: nothing is sent twice
        self.reports.append(self.uplink.close())
        self.refusing = socket.socket()
        self.refusing.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = self.refusing.getsockname()[1]
        dead = f"wss://127.0.0.1:{port}{edge_wire.PATH}"
        self.uplink = VehicleUplink(dead, self.credentials, self.folder)
        self.phase = "lost"

    def _reconnect(self) -> None:
        self.offline = self.uplink.close()
        self.reports.append(self.offline)
        if self.refusing is not None:
            self.refusing.close()
        self.uplink = VehicleUplink(self.url, self.credentials, self.folder)
        started = time.monotonic()
        if self.uplink.wait_acknowledged(60):
            self.caught_up_s = time.monotonic() - started
        self.acknowledged_after = self.uplink.report.acknowledged
        self.phase = "back"

    def wait_acknowledged(self, timeout: float) -> bool:
        if self.phase == "lost":  # the drive ended out of reach: it comes back now
            self._reconnect()
        return self.uplink.wait_acknowledged(timeout)

    def pending(self) -> int:
        return self.uplink.pending()

    def close(self) -> UplinkReport:
        if self.phase != "closed":
            self.reports.append(self.uplink.close())
            if self.refusing is not None:
                self.refusing.close()
            self.phase = "closed"
        return _total(self.reports)

    @property
    def caught_up(self) -> bool:
        """Every upload sent out of reach acknowledged once it reconnected."""
        return self.caught_up_s is not None and self.acknowledged_after == len(self.spooled)

    def story(self, region: str) -> str:
        def clock(ms: int) -> str:
            return time.strftime("%H:%M", time.gmtime(ms / 1000))

        waited = self.offline.spool.records_pending if self.offline.spool else 0
        caught_up = (
            f"all {self.acknowledged_after} acknowledged {self.caught_up_s:.2f} s after it "
            "reconnected"
            if self.caught_up
            else f"{self.acknowledged_after} acknowledged within 60 s of reconnecting"
        )
        return (
            f"{region}: {self.credentials.cert.stem} out of its gateway's reach from "
            f"{clock(self.lost_ms)} to {clock(self.back_ms)} UTC: "
            f"{self.offline.connect_failures} connection attempts failed "
            f"({readable(self.offline.last_error)}); {waited} uploads "
            f"({self.spooled_samples} samples) waited in its spool; {caught_up}"
        )


def handshake_answer(url: str, credentials: VehicleCredentials) -> str:
    """What a TLS client with these credentials hears from the gateway. With TLS 1.3 a
    client ends its side of the handshake before the server judges its certificate, and
    learns the verdict when it next reads: an alert, or the connection closed (asyncio
    drops the alert of a failed server handshake)."""
    where = urlsplit(url)
    host, port = where.hostname or "127.0.0.1", where.port or 443
    try:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            credentials.context().wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(f"GET {where.path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            answer = tls.recv(100)
    except ssl.SSLError as exc:
        return f"the gateway ends the TLS handshake with the alert {exc.reason}"
    except OSError as exc:
        return f"the gateway ends the TLS handshake: {type(exc).__name__}: {exc}"
    if not answer:
        return "the gateway closes the connection in the TLS handshake, before any HTTP"
    return f"NOT refused: the gateway answered {answer[:40]!r}"


def readable(error: str) -> str:
    """An aiohttp connection error without the repr of the SSL context in it."""
    return re.sub(r" ssl:<[^>]*>", "", error)

"""The development PKI of the vehicle edge: one region's CAs, the gateway's certificate,
vehicle certificates and the deny-list, as files (`vtp pki`).

    <pki dir>/vehicle-ca.pem, .key   issues vehicle client certificates; the gateway trusts it
    <pki dir>/edge-ca.pem, .key      issues the gateway's server certificate; vehicles trust it
    <pki dir>/gateway.pem, .key      the gateway's server certificate (serverAuth only)
    <pki dir>/vehicles/<VIN>.pem, .key   a vehicle's certificate (CN = VIN, clientAuth only)
    <pki dir>/revoked.txt            serials the gateway refuses, one per line, lower-case hex

Keys are EC P-256 (fast handshakes on small vehicle CPUs). Private keys are written
atomically with mode 600 in folders with mode 700; nothing here prints a key. The
``make_*`` functions are pure (keys and time in, certificate out); the rest is thin file
work around them. A development PKI: a production one keeps its CA keys offline.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas.registry import VIN_PATTERN
from vtp.core.regions import known_region

ORGANIZATION = "vtp development"
CA_DAYS = 3650
GATEWAY_DAYS = 825  # the longest a server certificate may live in browsers' rules
VEHICLE_DAYS = 730
BACKDATE = timedelta(minutes=5)  # a peer whose clock runs a little behind still accepts it
LOOPBACK = ("localhost", "127.0.0.1", "::1")
REVOKED_HEADER = (
    "# Serials of certificates the gateway refuses, one per line, lower-case hex without 0x\n"
    "# (`vtp pki revoke`). Lines starting with # are comments; blank lines are ignored.\n"
)


class PKIError(ValueError):
    """What a PKI step was given or found cannot be used (not a VIN, not a serial, a
    malformed deny-list line, a missing CA); the message says which and what to do."""


@dataclass(frozen=True)
class VehicleIdentity:
    vin: str
    cert_path: Path
    key_path: Path
    serial_hex: str
    replaced_serial_hex: str | None = None  # renewal: the old certificate, valid until revoked


@dataclass(frozen=True)
class RegionPKI:
    """One region's PKI files, and which of them `init_region` made this time."""

    directory: Path
    created: tuple[str, ...]

    @property
    def vehicle_ca(self) -> Path:
        return self.directory / "vehicle-ca.pem"

    @property
    def edge_ca(self) -> Path:
        return self.directory / "edge-ca.pem"

    @property
    def gateway_cert(self) -> Path:
        return self.directory / "gateway.pem"

    @property
    def gateway_key(self) -> Path:
        return self.directory / "gateway.key"

    @property
    def revoked(self) -> Path:
        return self.directory / "revoked.txt"


# --- pure: keys and time in, certificates out ---------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def ca_name(kind: str, region: str) -> str:
    """``kind`` is "vehicle" or "edge"."""
    return f"vtp dev {kind} CA {region}"


def make_ca(key: ec.EllipticCurvePrivateKey, common_name: str, now: datetime) -> x509.Certificate:
    """A self-signed CA that signs leaf certificates only (path length 0)."""
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def make_vehicle_cert(
    vin: str,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
) -> x509.Certificate:
    """A vehicle's client certificate: CN = VIN, clientAuth only."""
    return (
        _leaf(_name(check_vin(vin)), public_key, ca_cert, ca_key, now, VEHICLE_DAYS)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def make_gateway_cert(
    region: str,
    hosts: Sequence[str],
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
) -> x509.Certificate:
    """The gateway's server certificate for the loopback names and ``hosts``."""
    return (
        _leaf(_name(f"vtp gateway {region}"), public_key, ca_cert, ca_key, now, GATEWAY_DAYS)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _leaf(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    days: int,
) -> x509.CertificateBuilder:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())  # 159 random bits
        .not_valid_before(now - BACKDATE)
        # never past its CA: a verifier would refuse the chain from then on anyway
        .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*LOOPBACK, *hosts]):  # in order, once each
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def check_vin(vin: str) -> str:
    if not isinstance(vin, str) or not VIN_PATTERN.match(vin):
        hint = (
            " (VINs are upper case)"
            if isinstance(vin, str) and VIN_PATTERN.match(vin.upper())
            else ""
        )
        raise PKIError(
            f"{vin!r} is not a VIN: 17 characters of 0-9 and A-Z without I, O and Q{hint}"
        )
    return vin


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def vin_of(cert: x509.Certificate) -> str | None:
    """The certificate's subject CN when it is a VIN, else None."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = names[0].value if len(names) == 1 else None
    return cn if isinstance(cn, str) and VIN_PATTERN.match(cn) else None


_SERIAL = re.compile(r"^[0-9a-f]+$")


def parse_serial(text: str) -> str:
    """A serial as the deny-list keeps it, from hex written any common way (0x, upper case,
    colons as openssl prints them); PKIError for anything else."""
    cleaned = text.strip().lower().replace(":", "")
    cleaned = cleaned.removeprefix("0x")
    if not _SERIAL.match(cleaned):
        raise PKIError(f"{text.strip()!r} is not a certificate serial in hex")
    return format(int(cleaned, 16), "x")


def parse_revoked(text: str, source: str = "revoked.txt") -> frozenset[str]:
    """The serials of a deny-list; PKIError (a ValueError) naming the first malformed line."""
    found = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            found.add(parse_serial(entry))
        except ValueError as exc:
            raise PKIError(f"{source} line {number}: {exc}") from None
    return frozenset(found)


# --- files ---------------------------------------------------------------------------------


def read_revoked(path: Path) -> frozenset[str]:
    """The deny-list at ``path``. A malformed line raises PKIError (a ValueError) naming
    it (a gateway keeps its previous list then); a missing file raises FileNotFoundError,
    never an empty list: refusing nobody must be a file that says so."""
    return parse_revoked(path.read_text(), str(path))


def init_region(pki_dir: Path, region: str, hosts: Sequence[str] = ()) -> RegionPKI:
    """The region's CAs, gateway certificate and deny-list, made where missing. Existing
    CAs are kept (every certificate issued so far stays valid); the gateway certificate is
    reissued when it lacks one of ``hosts`` or its CA changed."""
    region = known_region(region)
    created: list[str] = []
    now = datetime.now(UTC)
    _private_dir(pki_dir)
    _ensure_ca(pki_dir, "vehicle-ca", ca_name("vehicle", region), now, created)
    edge_ca, edge_key = _ensure_ca(pki_dir, "edge-ca", ca_name("edge", region), now, created)
    pki = RegionPKI(pki_dir, ())
    if not _gateway_covers(pki.gateway_cert, pki.gateway_key, edge_ca, hosts):
        key = new_key()
        cert = make_gateway_cert(region, hosts, key.public_key(), edge_ca, edge_key, now)
        _write_key(pki.gateway_key, key)
        _write_atomic(pki.gateway_cert, _pem(cert), 0o644)
        created.append(pki.gateway_cert.name)
    if not pki.revoked.exists():
        _write_atomic(pki.revoked, REVOKED_HEADER.encode(), 0o644)
        created.append(pki.revoked.name)
    return RegionPKI(pki_dir, tuple(created))


def issue_vehicle(pki_dir: Path, vin: str, renew: bool = False) -> VehicleIdentity:
    """The vehicle's certificate and key, made by the region's vehicle CA. An existing one
    is returned as it is unless ``renew``: then a new key and serial replace the files,
    and the old certificate stays valid until it is revoked."""
    check_vin(vin)
    ca_cert, ca_key = _load_ca(pki_dir, "vehicle-ca")
    folder = _private_dir(pki_dir / "vehicles")
    cert_path, key_path = folder / f"{vin}.pem", folder / f"{vin}.key"
    replaced = None
    if cert_path.exists() and key_path.exists():
        cert = load_cert(cert_path)
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            if not renew:
                raise PKIError(
                    f"{cert_path} was not issued by {pki_dir / 'vehicle-ca.pem'}: renew it"
                ) from exc
        if not renew:
            return VehicleIdentity(vin, cert_path, key_path, serial_hex(cert))
        replaced = serial_hex(cert)
    key = new_key()
    cert = make_vehicle_cert(vin, key.public_key(), ca_cert, ca_key, datetime.now(UTC))
    _write_key(key_path, key)
    _write_atomic(cert_path, _pem(cert), 0o644)
    return VehicleIdentity(vin, cert_path, key_path, serial_hex(cert), replaced)


def revoke(
    pki_dir: Path, serial_hex_or_cert_path: str | Path, reason: str = ""
) -> tuple[str, bool]:
    """Add a serial (or a certificate file's serial) to the region's deny-list: (serial,
    whether it was new). The file is rewritten atomically, comments kept; the reason and
    time go in a comment above the serial."""
    given = str(serial_hex_or_cert_path)
    vin = None
    if isinstance(serial_hex_or_cert_path, Path) or given.endswith(".pem") or os.sep in given:
        # a path: the serial is read from the certificate, so no one copies it by hand
        cert = load_cert(Path(given))
        serial, vin = serial_hex(cert), vin_of(cert)
    else:
        serial = parse_serial(given)
    path = pki_dir / "revoked.txt"
    text = path.read_text() if path.exists() else REVOKED_HEADER
    if serial in parse_revoked(text, str(path)):
        return serial, False
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    note = " ".join(f"{vin or ''} {reason}".split())  # one line, whatever was typed
    if text and not text.endswith("\n"):
        text += "\n"
    text += f"# {stamp} {note}".rstrip() + f"\n{serial}\n"
    _private_dir(pki_dir)
    _write_atomic(path, text.encode(), 0o644)
    return serial, True


def forge_vehicle(out_dir: Path, vin: str, region: str = "eu") -> VehicleIdentity:
    """A certificate for ``vin`` from a self-signed CA with the same names as ``region``'s
    vehicle CA but another key: what a gateway must refuse (tests and the demo)."""
    check_vin(vin)
    folder = _private_dir(out_dir)
    now = datetime.now(UTC)
    ca_key, key = new_key(), new_key()
    ca_cert = make_ca(ca_key, ca_name("vehicle", region), now)
    _write_atomic(folder / "forged-vehicle-ca.pem", _pem(ca_cert), 0o644)
    cert = make_vehicle_cert(vin, key.public_key(), ca_cert, ca_key, now)
    cert_path, key_path = folder / f"forged-{vin}.pem", folder / f"forged-{vin}.key"
    _write_key(key_path, key)
    _write_atomic(cert_path, _pem(cert), 0o644)
    return VehicleIdentity(vin, cert_path, key_path, serial_hex(cert))


def describe(pki_dir: Path) -> Iterator[str]:
    """One line per file of the region's PKI: subject, serial, expiry; keys by mode only."""
    if not pki_dir.is_dir():
        yield f"{pki_dir}: no PKI (vtp pki init)"
        return
    revoked = pki_dir / "revoked.txt"
    try:
        denied = read_revoked(revoked)
        revoked_line = f"{revoked}: {len(denied)} revoked serial(s)"
    except (OSError, ValueError) as exc:
        denied, revoked_line = frozenset(), f"{revoked}: {exc}"
    pems = [pki_dir / f"{n}.pem" for n in ("vehicle-ca", "edge-ca", "gateway")]
    pems += sorted((pki_dir / "vehicles").glob("*.pem"))
    for pem in pems:
        if not pem.exists():
            yield f"{pem}: missing"
            continue
        cert = load_cert(pem)
        serial = serial_hex(cert)
        state = " REVOKED" if serial in denied else ""
        expiry = cert.not_valid_after_utc.strftime("%Y-%m-%d")
        yield f"{pem}: {cert.subject.rfc4514_string()}, serial {serial}, expires {expiry}{state}"
        key = pem.with_suffix(".key")
        if key.exists():
            yield f"{key}: private key, mode {key.stat().st_mode & 0o777:o}"
    yield revoked_line


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PKIError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PKIError(f"{path} is not a PEM certificate: {exc}") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path} is not an EC private key")
    return key


def _load_ca(pki_dir: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = pki_dir / f"{name}.pem", pki_dir / f"{name}.key"
    if not cert_path.exists() or not key_path.exists():
        raise PKIError(f"no {name} in {pki_dir}: run `vtp pki init --region R` first")
    cert, key = load_cert(cert_path), _load_key(key_path)
    if cert.public_key() != key.public_key():
        raise PKIError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _ensure_ca(
    pki_dir: Path, name: str, common_name: str, now: datetime, created: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA ``name``, made if its certificate is missing. A key without its certificate
    is a CA whose making was interrupted (nothing was issued by it): its key is kept."""
    cert_path, key_path = pki_dir / f"{name}.pem", pki_dir / f"{name}.key"
    if cert_path.exists():
        return _load_ca(pki_dir, name)
    if key_path.exists():
        key = _load_key(key_path)
    else:
        key = new_key()
        _write_key(key_path, key)
    cert = make_ca(key, common_name, now)
    _write_atomic(cert_path, _pem(cert), 0o644)
    created.append(cert_path.name)
    return cert, key


def _gateway_covers(
    cert_path: Path, key_path: Path, edge_ca: x509.Certificate, hosts: Sequence[str]
) -> bool:
    if not cert_path.exists() or not key_path.exists():
        return False
    cert = load_cert(cert_path)
    try:
        cert.verify_directly_issued_by(edge_ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if cert.public_key() != _load_key(key_path).public_key():
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(_san(hosts)) <= set(san)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, data, 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Readers see the old file or the new one, never half of one; the mode is set at
    creation, so a key is never readable by others, not even for a moment."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)  # left by an interrupted write, with whatever mode it had
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have taken bits a cert needs
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise

"""The development PKI: what each certificate says, who verifies it, the files' modes, the
deny-list, and real TLS handshakes in memory between a gateway and a vehicle."""

from __future__ import annotations

import ssl
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from producers import pki
from vtp.cli import main

VIN = "1HGCM82633A004352"
OTHER_VIN = "WVWZZZ1JZXW000001"


@pytest.fixture
def eu(tmp_path):
    return pki.init_region(tmp_path / "eu", "eu", ["gateway.example", "10.0.0.7"])


@pytest.fixture
def cn(tmp_path):
    return pki.init_region(tmp_path / "cn", "cn")


def verify_client(leaf: x509.Certificate, ca: x509.Certificate) -> x509.Certificate:
    """Path validation as a TLS server does it for a client certificate. Vehicle
    certificates name the vehicle in CN and carry no SubjectAlternativeName, which the
    web PKI defaults would require."""
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    verifier = (
        PolicyBuilder()
        .store(Store([ca]))
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
        .build_client_verifier()
    )
    return verifier.verify(leaf, []).chain[0]


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def test_a_vehicle_certificate_verifies_against_its_regions_vehicle_ca_only(eu, cn, tmp_path):
    vehicle = pki.load_cert(pki.issue_vehicle(eu.directory, VIN).cert_path)
    assert verify_client(vehicle, pki.load_cert(eu.vehicle_ca)) == vehicle
    for stranger in (cn.vehicle_ca, eu.edge_ca):
        with pytest.raises(VerificationError):
            verify_client(vehicle, pki.load_cert(stranger))
    forged = pki.load_cert(pki.forge_vehicle(tmp_path / "forged", VIN, "eu").cert_path)
    assert forged.issuer == vehicle.issuer and vin_of_both(forged, vehicle) == VIN
    with pytest.raises(VerificationError):
        verify_client(forged, pki.load_cert(eu.vehicle_ca))


def vin_of_both(a: x509.Certificate, b: x509.Certificate) -> str | None:
    return pki.vin_of(a) if pki.vin_of(a) == pki.vin_of(b) else None


def test_the_gateway_certificate_is_no_client_certificate(eu):
    with pytest.raises(VerificationError):
        verify_client(pki.load_cert(eu.gateway_cert), pki.load_cert(eu.edge_ca))


def test_certificates_say_what_the_spec_says(eu):
    made = pki.issue_vehicle(eu.directory, VIN)
    vehicle = pki.load_cert(made.cert_path)
    assert pki.vin_of(vehicle) == VIN and made.serial_hex == pki.serial_hex(vehicle)
    assert vehicle.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "vtp development"
    )
    assert list(ext(vehicle, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = ext(vehicle, x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.key_encipherment
    assert ext(vehicle, x509.BasicConstraints).value.ca is False
    assert 64 < vehicle.serial_number.bit_length() <= 159
    life = vehicle.not_valid_after_utc - vehicle.not_valid_before_utc
    assert timedelta(days=730) <= life <= timedelta(days=731)
    assert made.cert_path.read_text().count("BEGIN CERTIFICATE") == 1  # the leaf only

    for path, kind in ((eu.vehicle_ca, "vehicle"), (eu.edge_ca, "edge")):
        ca = pki.load_cert(path)
        assert ca.subject.rfc4514_string() == f"O=vtp development,CN=vtp dev {kind} CA eu"
        constraints = ext(ca, x509.BasicConstraints)
        assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
        usage = ext(ca, x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign
        assert ca.not_valid_after_utc - ca.not_valid_before_utc >= timedelta(days=3650)

    gateway = pki.load_cert(eu.gateway_cert)
    assert list(ext(gateway, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ext(gateway, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gateway.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "10.0.0.7",
    ]
    assert gateway.not_valid_after_utc - gateway.not_valid_before_utc <= timedelta(days=826)
    assert pki.vin_of(gateway) is None
    for cert in (vehicle, gateway, pki.load_cert(eu.vehicle_ca)):
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_keys_are_private_files_in_private_folders(eu):
    made = pki.issue_vehicle(eu.directory, VIN)
    for key in ("vehicle-ca.key", "edge-ca.key", "gateway.key"):
        assert (eu.directory / key).stat().st_mode & 0o777 == 0o600
    assert made.key_path.stat().st_mode & 0o777 == 0o600
    assert eu.directory.stat().st_mode & 0o777 == 0o700
    assert made.key_path.parent.stat().st_mode & 0o777 == 0o700
    assert not list(eu.directory.rglob("*.partial"))


def test_init_again_keeps_the_cas_and_reissues_the_gateway_only_for_new_names(eu):
    cas = {p: p.read_bytes() for p in eu.directory.glob("*-ca.*")}
    vehicle = pki.load_cert(pki.issue_vehicle(eu.directory, VIN).cert_path)
    gateway = eu.gateway_cert.read_bytes()

    again = pki.init_region(eu.directory, "eu", ["gateway.example"])
    assert again.created == ()
    assert eu.gateway_cert.read_bytes() == gateway
    more = pki.init_region(eu.directory, "eu", ["gateway.example", "edge.internal"])
    assert more.created == ("gateway.pem",)
    assert {p: p.read_bytes() for p in eu.directory.glob("*-ca.*")} == cas
    assert verify_client(vehicle, pki.load_cert(eu.vehicle_ca)) == vehicle
    assert eu.revoked.read_text().startswith("#")


def test_init_refuses_a_ca_certificate_without_its_key(eu):
    (eu.directory / "vehicle-ca.key").unlink()
    with pytest.raises(pki.PKIError, match="no vehicle-ca"):
        pki.init_region(eu.directory, "eu")


@pytest.mark.parametrize(
    "not_a_vin",
    ["1hgcm82633a004352", "1HGCM82633A00435", "1HGCM82633A0043521", "1HGCM82633I004352", "../x"],
)
def test_issue_refuses_what_is_not_a_vin(eu, not_a_vin):
    with pytest.raises(ValueError, match="is not a VIN"):
        pki.issue_vehicle(eu.directory, not_a_vin)
    assert not list((eu.directory / "vehicles").glob("*"))


def test_issue_needs_the_regions_ca(tmp_path):
    with pytest.raises(pki.PKIError, match="vtp pki init"):
        pki.issue_vehicle(tmp_path / "eu", VIN)


def test_issue_again_returns_the_same_certificate_unless_renewed(eu):
    first = pki.issue_vehicle(eu.directory, VIN)
    old = pki.load_cert(first.cert_path)
    assert pki.issue_vehicle(eu.directory, VIN) == first
    renewed = pki.issue_vehicle(eu.directory, VIN, renew=True)
    assert renewed.serial_hex != first.serial_hex
    assert renewed.replaced_serial_hex == first.serial_hex
    assert verify_client(old, pki.load_cert(eu.vehicle_ca)) == old  # until it is revoked


def test_a_vehicle_of_another_ca_is_not_returned_as_if_it_were_this_regions(eu, cn):
    theirs = pki.issue_vehicle(cn.directory, VIN)
    folder = eu.directory / "vehicles"
    folder.mkdir(exist_ok=True)
    for path in (theirs.cert_path, theirs.key_path):
        (folder / path.name).write_bytes(path.read_bytes())
    with pytest.raises(pki.PKIError, match="was not issued by"):
        pki.issue_vehicle(eu.directory, VIN)
    renewed = pki.issue_vehicle(eu.directory, VIN, renew=True)
    assert verify_client(pki.load_cert(renewed.cert_path), pki.load_cert(eu.vehicle_ca))


def test_revoke_and_read_revoked_round_trip(eu):
    one = pki.issue_vehicle(eu.directory, VIN)
    two = pki.issue_vehicle(eu.directory, OTHER_VIN)
    assert pki.read_revoked(eu.revoked) == frozenset()
    assert pki.revoke(eu.directory, "0x" + one.serial_hex.upper(), "stolen") == (
        one.serial_hex,
        True,
    )
    assert pki.revoke(eu.directory, two.cert_path, reason="sold\nscrapped") == (
        two.serial_hex,
        True,
    )
    assert pki.revoke(eu.directory, one.serial_hex) == (one.serial_hex, False)
    assert pki.read_revoked(eu.revoked) == {one.serial_hex, two.serial_hex}
    text = eu.revoked.read_text()
    assert text.startswith(pki.REVOKED_HEADER)
    assert f"{OTHER_VIN} sold scrapped\n{two.serial_hex}\n" in text and "stolen" in text
    assert text.count(one.serial_hex) == 1


def test_read_revoked_is_tolerant_of_how_a_serial_is_written(tmp_path):
    path = tmp_path / "revoked.txt"
    path.write_text("# header\n\n0xAB\n  0a:bc:DE  \nef # a note\n\t00ff\n")
    assert pki.read_revoked(path) == {"ab", "abcde", "ef", "ff"}


@pytest.mark.parametrize("line", ["xyz", "0x", "ab cd", "12-34", "ab;"])
def test_a_malformed_deny_list_line_is_named(tmp_path, line):
    path = tmp_path / "revoked.txt"
    path.write_text(f"# header\nab\n{line}\n")
    with pytest.raises(ValueError, match=r"revoked.txt line 3: .*not a certificate serial"):
        pki.read_revoked(path)


def test_a_missing_deny_list_is_an_error_not_an_empty_list(tmp_path):
    with pytest.raises(FileNotFoundError):
        pki.read_revoked(tmp_path / "revoked.txt")


# --- TLS handshakes in memory: the contexts a gateway and a vehicle would build ---------


def gateway_context(region: pki.RegionPKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=region.vehicle_ca)
    ctx.load_cert_chain(region.gateway_cert, region.gateway_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # the default of Python 3.13
    return ctx


def vehicle_context(vehicle: pki.VehicleIdentity, edge_ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=edge_ca)
    ctx.load_cert_chain(vehicle.cert_path, vehicle.key_path)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def handshake(server_ctx, client_ctx, hostname: str) -> tuple[str, dict | None]:
    """Drive both ends over memory BIOs. Returns ("ok", the peer certificate the gateway
    saw), or raises the SSLError of the side that refused, named in its note."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)

    def step(side: str, action) -> bool:
        try:
            action()
            return True
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            exc.add_note(side)
            raise
        finally:
            s_in.write(c_out.read())
            c_in.write(s_out.read())

    done = {"client": False, "server": False}
    for _ in range(10):
        done["client"] = done["client"] or step("client", client.do_handshake)
        done["server"] = done["server"] or step("server", server.do_handshake)
        if all(done.values()):
            break
    # TLS 1.3: the client is done before the server has judged its certificate; a byte
    # each way proves that both ends accepted.
    got = {}
    step("client", lambda: client.write(b"u"))
    step("server", lambda: got.update(server=server.read(1)))
    step("server", lambda: server.write(b"a"))
    step("client", lambda: got.update(client=client.read(1)))
    assert got == {"server": b"u", "client": b"a"}
    return "ok", server.getpeercert()


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_a_vehicle_and_its_regions_gateway_shake_hands(eu, hostname):
    vehicle = pki.issue_vehicle(eu.directory, VIN)
    result, peer = handshake(gateway_context(eu), vehicle_context(vehicle, eu.edge_ca), hostname)
    assert result == "ok"
    assert dict(x[0] for x in peer["subject"])["commonName"] == VIN


def test_the_gateway_refuses_a_forged_vehicle_certificate(eu, tmp_path):
    forged = pki.forge_vehicle(tmp_path / "forged", VIN, "eu")
    with pytest.raises(ssl.SSLError, match="certificate verify failed") as refused:
        handshake(gateway_context(eu), vehicle_context(forged, eu.edge_ca), "localhost")
    assert refused.value.__notes__ == ["server"]


def test_the_gateway_refuses_a_vehicle_of_another_region(eu, cn):
    theirs = pki.issue_vehicle(cn.directory, VIN)
    with pytest.raises(ssl.SSLError, match="certificate verify failed") as refused:
        handshake(gateway_context(eu), vehicle_context(theirs, eu.edge_ca), "localhost")
    assert refused.value.__notes__ == ["server"]


def test_a_vehicle_refuses_another_regions_gateway(eu, cn):
    vehicle = pki.issue_vehicle(eu.directory, VIN)
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        handshake(gateway_context(cn), vehicle_context(vehicle, eu.edge_ca), "localhost")
    assert refused.value.__notes__ == ["client"]


def test_a_vehicle_refuses_a_name_the_gateway_certificate_lacks(eu):
    vehicle = pki.issue_vehicle(eu.directory, VIN)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(gateway_context(eu), vehicle_context(vehicle, eu.edge_ca), "elsewhere.example")


# --- the CLI ---------------------------------------------------------------------------


def test_vtp_pki_init_issue_revoke_show(tmp_path, monkeypatch, capsys):
    import os

    for name in [n for n in os.environ if n.startswith("VTP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VTP_DATA_DIR", str(tmp_path))
    folder = tmp_path / "eu" / "pki"

    assert main(["pki", "init", "--region", "eu", "--host", "gw.example"]) == 0
    assert "vehicle-ca.pem" in capsys.readouterr().out
    assert main(["pki", "init", "--region", "eu", "--host", "gw.example"]) == 0
    assert "nothing (all existed)" in capsys.readouterr().out

    assert main(["pki", "issue", VIN, OTHER_VIN, "--region", "eu"]) == 0
    assert sorted(p.name for p in (folder / "vehicles").iterdir()) == sorted(
        f"{v}.{ext}" for v in (VIN, OTHER_VIN) for ext in ("pem", "key")
    )
    capsys.readouterr()
    assert main(["pki", "issue", "1HGCM82633A00435X", "NOTAVIN", "--region", "eu"]) == 1
    assert "'NOTAVIN' is not a VIN" in capsys.readouterr().err
    assert not (folder / "vehicles" / "1HGCM82633A00435X.pem").exists()  # none or all

    cert = folder / "vehicles" / f"{VIN}.pem"
    assert main(["pki", "revoke", str(cert), "--region", "eu", "--reason", "test"]) == 0
    serial = pki.serial_hex(pki.load_cert(cert))
    assert capsys.readouterr().out.strip() == f"serial {serial} revoked"
    assert pki.read_revoked(folder / "revoked.txt") == {serial}

    assert main(["pki", "show", "--region", "eu"]) == 0
    out = capsys.readouterr().out
    assert f"CN={VIN}" in out and f"serial {serial}" in out and "REVOKED" in out
    assert "mode 600" in out and "PRIVATE KEY" not in out and "1 revoked serial(s)" in out
    key_text = (folder / "gateway.key").read_text().splitlines()[1]
    assert key_text not in out

    assert main(["pki", "revoke", "nothex", "--region", "eu"]) == 1
    assert "not a certificate serial" in capsys.readouterr().err

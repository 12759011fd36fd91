"""Node identity: SPIFFE names, the fleet CA, loading a box's identity, chain verification, signatures, TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from fixtures_identity import FleetCA

from edged.errors import EdgedError, IdentityError
from edged.identity import (
    IdentityFiles,
    TrustBundle,
    clock_problem,
    identity_dir,
    load_identity,
    parse_spiffe_id,
    spiffe_id,
    summary,
    verify_signature,
)
from edged.identity.issue import cert_pem, create_ca, csr_pem, generate_key, load_csr, make_csr, sign_csr
from edged.identity.tls import client_context, peer_name, server_context

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


# ------------------------------------------------------------------------------------------------ names


def test_spiffe_id_round_trips():
    assert spiffe_id("home", "pi-1") == "spiffe://home/node/pi-1"
    assert parse_spiffe_id("spiffe://home/node/Pi_1.lan") == ("home", "Pi_1.lan")
    assert identity_dir("/var/lib/edged") == "/var/lib/edged/identity"


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://home/node/pi-1/x",
        "spiffe://home/node/",
        "spiffe://home/svc/pi-1",
        "spiffe://Home/node/pi-1",  # a trust domain is lowercase
        "spiffe://home:443/node/pi-1",
        "spiffe://user@home/node/pi-1",
        "spiffe://home/node/pi-1?x=1",
        "spiffe://home/node/pi-1#f",
        "spiffe://home/node/..",
        "https://home/node/pi-1",
        "spiffe://home/node/" + "a" * 300,
    ],
)
def test_parse_spiffe_id_refuses_anything_else(uri):
    with pytest.raises(IdentityError):
        parse_spiffe_id(uri)


def test_spiffe_id_refuses_a_fleet_that_cannot_be_a_trust_domain():
    with pytest.raises(IdentityError, match="trust domain"):
        spiffe_id("Home", "pi-1")
    assert issubclass(IdentityError, EdgedError)


# ------------------------------------------------------------------------------------- the box's files


def test_enrolled_identity_loads_and_signs(tmp_path):
    ca = FleetCA("home")
    folder = tmp_path / "identity"
    files = ca.enroll(folder, "pi-1")
    assert oct(os.stat(files.key).st_mode & 0o777) == "0o600"
    ident = load_identity(str(folder))
    assert ident is not None
    assert (ident.fleet, ident.node, ident.spiffe_id) == ("home", "pi-1", "spiffe://home/node/pi-1")
    assert ident.not_after - ident.not_before == dt.timedelta(seconds=86400 + 300)  # backdated 5 min
    assert ident.not_before < ident.renew_after < ident.not_after
    signature = ident.sign(b"a request")
    verify_signature(ident.cert, b"a request", signature)
    with pytest.raises(IdentityError, match="does not match"):
        verify_signature(ident.cert, b"another request", signature)
    other = FleetCA("home").enroll(tmp_path / "other", "pi-1")
    with pytest.raises(IdentityError, match="does not match"):
        verify_signature(load_identity(other.dir).cert, b"a request", signature)


def test_summary_reads_the_certificate_without_cryptography(tmp_path):
    files = FleetCA("home").enroll(tmp_path, "pi-1", lifetime=3600)
    script = (
        "import sys; from edged.identity import summary; s = summary(sys.argv[1]);"
        "print(s.fleet, s.node, int(s.not_after - s.not_before), 'cryptography' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script, files.cert], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["home", "pi-1", str(3600 + 300), "False"]
    s = summary(files.cert)
    assert s.renew_after == pytest.approx(s.not_before + (3600 + 300) * 2 / 3)


def test_no_identity_is_none_and_half_an_identity_is_an_error(tmp_path):
    assert load_identity(str(tmp_path)) is None
    files = FleetCA("home").enroll(tmp_path, "pi-1")
    os.unlink(files.cert)
    with pytest.raises(IdentityError, match="no certificate yet"):
        load_identity(str(tmp_path))


def test_a_key_open_to_others_is_refused(tmp_path):
    files = FleetCA("home").enroll(tmp_path, "pi-1")
    os.chmod(files.key, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(str(tmp_path))


def test_a_certificate_for_another_key_is_refused(tmp_path):
    ca = FleetCA("home")
    files = ca.enroll(tmp_path / "a", "pi-1")
    other = ca.enroll(tmp_path / "b", "pi-1")
    os.replace(other.cert, files.cert)
    with pytest.raises(IdentityError, match="not for the key"):
        load_identity(files.dir)


# ------------------------------------------------------------------------------------------- verification


def chain_of(files: IdentityFiles) -> list[x509.Certificate]:
    return list(load_identity(files.dir).chain)


def test_bundle_verifies_a_leaf_of_its_ca_within_the_skew(tmp_path):
    ca = FleetCA("home", now=NOW)
    chain = chain_of(ca.enroll(tmp_path, "pi-1", now=NOW, lifetime=3600))
    bundle = TrustBundle.from_pem(ca.pem)
    assert bundle.verify(chain, NOW) == ("home", "pi-1")
    end = NOW + dt.timedelta(hours=1)
    assert bundle.verify(chain, end + dt.timedelta(seconds=15), skew=20) == ("home", "pi-1")
    with pytest.raises(IdentityError, match="expired at 2026-12-02T09:00:00Z"):
        bundle.verify(chain, end + dt.timedelta(seconds=25), skew=20)


def test_a_leaf_states_both_uses_of_its_key(tmp_path):
    """Signatures (TLS, seals) and key agreement (the cloud tier's per-pair MAC keys, edged/cloud/pairing.py)."""
    ca = FleetCA("home", now=NOW)
    leaf = chain_of(ca.enroll(tmp_path, "pi-1", now=NOW))[0]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_agreement
    assert not usage.value.key_cert_sign


def test_a_clock_in_the_past_is_named(tmp_path):
    ca = FleetCA("home", now=NOW)
    chain = chain_of(ca.enroll(tmp_path, "pi-1", now=NOW))
    booted = dt.datetime(1970, 1, 1, 0, 0, 42, tzinfo=UTC)  # a Pi without RTC before NTP answers
    with pytest.raises(IdentityError, match="is this box's clock right"):
        TrustBundle.from_pem(ca.pem).verify(chain, booted)
    s = summary(os.path.join(tmp_path, "node.crt"))
    assert "TLS with peers is impossible until the clock is set" in clock_problem(s, booted.timestamp(), 20)
    assert clock_problem(s, NOW.timestamp(), 20) is None
    assert "expired" in clock_problem(s, (NOW + dt.timedelta(days=2)).timestamp(), 20)


def test_a_leaf_of_another_ca_is_refused(tmp_path):
    chain = chain_of(FleetCA("home").enroll(tmp_path, "pi-1"))
    with pytest.raises(IdentityError, match="not issued by a CA of the trust bundle"):
        TrustBundle.from_pem(FleetCA("home").pem).verify(chain)


def test_ca_rotation_with_a_two_ca_bundle(tmp_path):
    old, new = FleetCA("home"), FleetCA("home")
    old_leaf = chain_of(old.enroll(tmp_path / "a", "pi-1"))
    new_leaf = chain_of(new.enroll(tmp_path / "b", "pi-2"))
    both = TrustBundle.from_pem(old.pem + new.pem)
    assert both.verify(old_leaf) == ("home", "pi-1")
    assert both.verify(new_leaf) == ("home", "pi-2")
    with pytest.raises(IdentityError, match="not issued by"):
        TrustBundle.from_pem(new.pem).verify(old_leaf)  # the old CA retired


def forge_leaf(ca: FleetCA, uris: list[str], *, is_ca: bool = False) -> x509.Certificate:
    key = generate_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(UTC) - dt.timedelta(minutes=1))
        .not_valid_after(dt.datetime.now(UTC) + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256())


def test_a_ca_of_one_fleet_cannot_vouch_for_another():
    office = FleetCA("office")
    forged = forge_leaf(office, ["spiffe://home/node/pi-1"])
    with pytest.raises(IdentityError, match="issued by the CA of fleet 'office'"):
        TrustBundle.from_pem(FleetCA("home").pem + office.pem).verify([forged])


@pytest.mark.parametrize(
    ("uris", "is_ca", "message"),
    [
        ([], False, "exactly one URI SAN"),
        (["spiffe://home/node/a", "spiffe://home/node/b"], False, "exactly one URI SAN"),
        (["spiffe://home/node/a"], True, "is a CA certificate"),
        (["https://home/node/a"], False, "not a node SPIFFE ID"),
    ],
)
def test_malformed_leaves_are_refused(uris, is_ca, message):
    ca = FleetCA("home")
    with pytest.raises(IdentityError, match=message):
        TrustBundle.from_pem(ca.pem).verify([forge_leaf(ca, uris, is_ca=is_ca)])


def test_a_chain_through_an_intermediate(tmp_path):
    root = FleetCA("home")
    inter_key = generate_key()
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "home online signer")]))
        .issuer_name(root.cert.subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(UTC) - dt.timedelta(minutes=1))
        .not_valid_after(dt.datetime.now(UTC) + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://home")]), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    leaf = sign_csr(make_csr(generate_key(), "home", "pi-1"), inter_key, inter)
    bundle = TrustBundle.from_pem(root.pem)
    assert bundle.verify([leaf, inter]) == ("home", "pi-1")
    with pytest.raises(IdentityError, match="not issued by"):
        bundle.verify([leaf])  # the intermediate is missing


def test_bundle_refuses_what_is_not_a_ca(tmp_path):
    files = FleetCA("home").enroll(tmp_path, "pi-1")
    with pytest.raises(IdentityError, match="not a CA certificate"):
        TrustBundle.load(files.cert)
    with pytest.raises(IdentityError, match="no PEM certificate"):
        TrustBundle.from_pem(b"garbage")


# --------------------------------------------------------------------------------------------- issuance


def test_sign_csr_takes_only_name_and_key_and_checks_both():
    ca = FleetCA("home")
    key = generate_key()
    csr = load_csr(csr_pem(make_csr(key, "home", "pi-1")))
    cert = sign_csr(csr, ca.key, ca.cert, node="pi-1", lifetime=600)
    assert TrustBundle.from_pem(ca.pem).verify([cert]) == ("home", "pi-1")
    with pytest.raises(IdentityError, match="not 'pi-2'"):
        sign_csr(csr, ca.key, ca.cert, node="pi-2")
    with pytest.raises(IdentityError, match="this CA issues for fleet 'home'"):
        sign_csr(make_csr(key, "office", "pi-1"), ca.key, ca.cert)
    with pytest.raises(IdentityError, match="not a PEM certificate signing request"):
        load_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")


def test_a_node_certificate_never_outlives_its_ca():
    key, ca_cert = create_ca("home", days=1)
    cert = sign_csr(make_csr(generate_key(), "home", "pi-1"), key, ca_cert, lifetime=7 * 86400)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc
    assert cert_pem(cert).startswith(b"-----BEGIN CERTIFICATE-----")


# -------------------------------------------------------------------------------------------------- TLS


async def handshake(server_files: IdentityFiles, client_files: IdentityFiles):
    """(what the server saw of the client or None, what the client read) over a real TLS 1.3 connection."""
    seen: list = []

    async def serve(reader, writer):
        seen.append(peer_name(writer.get_extra_info("ssl_object")))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context(server_files))
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(client_files))
        except (ssl.SSLError, ConnectionError):
            return None, None  # the client refused the server
        try:
            got = await asyncio.wait_for(reader.read(2), 5)
        except (ssl.SSLError, ConnectionError):
            got = b""  # in TLS 1.3 the server refuses the client's certificate after the client finished
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        writer.close()
        return (seen[0] if seen else None), (peer_name(ssl_object) if got else None)
    finally:
        server.close()
        await server.wait_closed()


def test_mutual_tls_names_both_sides(tmp_path):
    ca = FleetCA("home")
    a, b = ca.enroll(tmp_path / "a", "pi-a"), ca.enroll(tmp_path / "b", "pi-b")
    assert asyncio.run(handshake(a, b)) == (("home", "pi-b"), ("home", "pi-a"))


def test_mutual_tls_refuses_a_stranger_both_ways(tmp_path):
    a = FleetCA("home").enroll(tmp_path / "a", "pi-a")
    stranger = FleetCA("home").enroll(tmp_path / "b", "pi-b", bundle=Path(a.ca).read_bytes())
    assert asyncio.run(handshake(a, stranger)) == (None, None)  # the server never served the stranger
    assert asyncio.run(handshake(stranger, a)) == (None, None)  # the client refused the stranger's server

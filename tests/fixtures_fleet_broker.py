"""A fleet's Mosquitto as `config/mosquitto/` ships it (TLS, client certificates from the fleet CA, the ACL),
on a free port, and nodes enrolled into it. Import the fixture with
`from fixtures_fleet_broker import fleet_broker  # noqa: F401`."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from fixtures_identity import FleetCA
from fixtures_mqtt import REPO, Broker

from edged.identity import IdentityFiles
from edged.identity.files import write_file
from edged.identity.issue import cert_pem, generate_key, key_pem

SHIPPED = REPO / "config" / "mosquitto"


def server_certificate(ca: FleetCA) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a broker at 127.0.0.1 / localhost, issued by the fleet CA."""
    key = generate_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        # As any CA's server certificate has them: Python 3.13's default contexts (VERIFY_X509_STRICT) refuse a
        # certificate with no Authority Key Identifier.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return key_pem(key), cert_pem(cert)


class FleetBroker(Broker):
    """Mosquitto with the shipped hubmesh.conf and acl, paths and port made local, topic prefix `prefix`."""

    def __init__(self, root: Path, ca: FleetCA, prefix: str, bridges: tuple[str, ...] = ("cloud-1",)) -> None:
        super().__init__(root)
        self.ca = ca
        self.prefix = prefix
        key, cert = server_certificate(ca)
        write_file(str(root / "broker.key"), key, 0o600)
        write_file(str(root / "broker.crt"), cert, 0o644)
        write_file(str(root / "ca.pem"), ca.pem, 0o644)
        acl = (SHIPPED / "acl").read_text().replace("hubmesh/", f"{prefix}/")
        for name in bridges[1:]:  # the shipped file names one bridge, cloud-1
            acl += f"\nuser {name}\ntopic read {prefix}/+/svc/+/req\ntopic write {prefix}/+/reply/+\n"
        (root / "acl").write_text(acl)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        text = (SHIPPED / "hubmesh.conf").read_text()
        text = text.replace("/etc/mosquitto/hubmesh/", f"{self.root}/")
        text = text.replace("listener 8883", f"listener {self.port} 127.0.0.1")
        text = text.replace("persistence true", "persistence false")
        # As root, Mosquitto drops to user `mosquitto`, who cannot read the test's private folder.
        return text + "\nlog_dest stderr\nuser root\n"

    def enroll(self, folder: Path, node: str, **kw) -> IdentityFiles:
        """A node's identity in `folder` (as `{state.dir}/identity`)."""
        folder.mkdir(parents=True, exist_ok=True)
        return self.ca.enroll(folder, node, **kw)


@pytest.fixture
def fleet_broker(tmp_path: Path, topic_prefix: str) -> Iterator[FleetBroker]:
    """The shipped Mosquitto configuration for fleet `home`, started; ended by PID after the test."""
    b = FleetBroker(tmp_path / "fleet-broker", FleetCA("home"), topic_prefix)
    b.start()
    yield b
    b.kill()

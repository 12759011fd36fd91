"""Issuance: the fleet CA's commands offline, and enrollment / renewal over MQTT with one-time join tokens."""

# ruff: noqa: F811  (fixtures imported from fixtures_mqtt are test parameters)
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fixtures_mqtt import broker, topic_prefix  # noqa: F401

from edged.identity import TrustBundle, load_identity
from edged.identity.enrollment import Request, enroll_proof, random_id, renew_message, split_token
from edged.identity.issue import csr_pem, generate_key, make_csr
from edged.identity.signer import decide, init_ca

REPO = Path(__file__).resolve().parents[1]


def edged(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "edged", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def box_config(root: Path, node: str, fleet: str = "home", mqtt: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "edged.toml"
    path.write_text(f'[node]\nname = "{node}"\nfleet = "{fleet}"\n[state]\ndir = "state"\n' + textwrap.dedent(mqtt))
    return path


# -- the signer's decisions (no broker) --------------------------------------------------------------------


def enroll_request(token: str, node: str, key=None) -> Request:
    token_id, secret = split_token(token)
    csr = csr_pem(make_csr(key or generate_key(), "home", node)).decode()
    request_id = random_id()
    return Request(request_id, node, csr, token=token_id, proof=enroll_proof(secret, request_id, csr))


def test_a_join_token_enrolls_once_and_only_its_holder(tmp_path):
    ca = init_ca(str(tmp_path / "ca"), "home", 30)
    token = ca.tokens.add(None, 3600)
    request, answer = decide(ca, enroll_request(token, "pi-1").encode())
    assert answer.error is None and request is not None and request.node == "pi-1"
    assert "BEGIN CERTIFICATE" in answer.cert and answer.mac
    _, again = decide(ca, enroll_request(token, "pi-2").encode())
    assert "already used" in again.error
    token_id, _ = split_token(ca.tokens.add(None, 3600))
    _, wrong = decide(ca, enroll_request(f"{token_id}.not-the-secret", "pi-3").encode())
    assert wrong.error == "wrong join token"
    _, unknown = decide(ca, enroll_request("0123456789ab.whatever", "pi-3").encode())
    assert unknown.error == "wrong join token"


def test_a_stolen_proof_does_not_carry_another_csr(tmp_path):
    """A listener on the broker sees the token id and proof, never the secret: bound to the CSR it came with."""
    ca = init_ca(str(tmp_path / "ca"), "home", 30)
    honest = enroll_request(ca.tokens.add(None, 3600), "pi-1")
    forged = Request(
        honest.id, "pi-1", csr_pem(make_csr(generate_key(), "home", "pi-1")).decode(), honest.token, honest.proof
    )
    _, answer = decide(ca, forged.encode())
    assert answer.error == "wrong join token"
    assert decide(ca, honest.encode())[1].error is None  # the holder is not locked out by the attempt


def test_expired_and_node_bound_tokens(tmp_path):
    ca = init_ca(str(tmp_path / "ca"), "home", 30)
    expired = ca.tokens.add(None, 60, now=time.time() - 120)
    assert "expired" in decide(ca, enroll_request(expired, "pi-1").encode())[1].error
    bound = ca.tokens.add("pi-1", 3600)
    assert "for node 'pi-1', not 'pi-2'" in decide(ca, enroll_request(bound, "pi-2").encode())[1].error
    assert decide(ca, enroll_request(bound, "pi-1").encode())[1].error is None
    assert "not a version 1 message" in decide(ca, b'{"v": 9}')[1].error
    assert "larger than" in decide(ca, b"x" * 100_000)[1].error


def test_renewal_needs_the_current_certificate_and_keeps_the_key(tmp_path):
    ca = init_ca(str(tmp_path / "ca"), "home", 30)
    key = generate_key()
    _, first = decide(ca, enroll_request(ca.tokens.add(None, 3600), "pi-1", key).encode())
    chain = first.cert

    def renewal(node: str, signing_key, csr_key) -> Request:
        csr = csr_pem(make_csr(csr_key, "home", node)).decode()
        request_id = random_id()
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        sig = signing_key.sign(renew_message(request_id, csr), ec.ECDSA(hashes.SHA256())).hex()
        return Request(request_id, node, csr, chain=chain, sig=sig)

    _, renewed = decide(ca, renewal("pi-1", key, key).encode())
    assert renewed.error is None and renewed.sig and renewed.cert != first.cert
    assert "must come from that node" in decide(ca, renewal("pi-2", key, key).encode())[1].error
    assert "does not match" in decide(ca, renewal("pi-1", generate_key(), key).encode())[1].error
    assert "keeps the node's key" in decide(ca, renewal("pi-1", key, generate_key()).encode())[1].error


# -- the commands ------------------------------------------------------------------------------------------


def test_offline_enrollment_with_the_commands(tmp_path):
    config = box_config(tmp_path / "box", "pi-1")
    assert edged("fleet", "ca", "init", "--fleet", "home", "--dir", "ca", cwd=tmp_path).returncode == 0
    assert oct(os.stat(tmp_path / "ca" / "ca.key").st_mode & 0o777) == "0o600"
    again = edged("fleet", "ca", "init", "--fleet", "home", "--dir", "ca", cwd=tmp_path)
    assert again.returncode == 1 and "not overwritten" in again.stderr
    out = edged("fleet", "enroll", "-c", str(config), cwd=tmp_path)
    assert out.returncode == 0 and "node.csr" in out.stdout
    identity = tmp_path / "box" / "state" / "identity"
    signed = edged("fleet", "ca", "sign", str(identity / "node.csr"), "--dir", "ca", "-o", "pi-1.crt", cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    wrong_ca = tmp_path / "other"
    init_ca(str(wrong_ca), "home", 30)
    refused = edged(
        "fleet", "enroll", "-c", str(config), "--cert", "pi-1.crt", "--ca", str(wrong_ca / "ca.pem"), cwd=tmp_path
    )
    assert refused.returncode == 1 and "not issued by a CA of the trust bundle" in refused.stderr
    done = edged("fleet", "enroll", "-c", str(config), "--cert", "pi-1.crt", "--ca", "ca/ca.pem", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ident = load_identity(str(identity))
    assert (ident.fleet, ident.node) == ("home", "pi-1")
    assert TrustBundle.load(str(identity / "ca.pem")).verify(list(ident.chain)) == ("home", "pi-1")


def test_online_enrollment_over_a_real_broker_with_used_and_wrong_tokens(tmp_path, broker, topic_prefix):
    mqtt = f'[mqtt]\nenabled = true\nurl = "{broker.url}"\ntopic_prefix = "{topic_prefix}"\n'
    operator = box_config(tmp_path / "operator", "operator", mqtt=mqtt)
    assert edged("fleet", "ca", "init", "--fleet", "home", "--dir", "ca", cwd=tmp_path / "operator").returncode == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    signer = subprocess.Popen(
        [sys.executable, "-m", "edged", "fleet", "ca", "serve", "--dir", "ca", "-c", str(operator)],
        cwd=tmp_path / "operator",
        env=env,
        stdout=(tmp_path / "signer.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        made = edged("fleet", "ca", "token", "--dir", "ca", "--node", "pi-1", cwd=tmp_path / "operator")
        token = made.stdout.strip()
        box = box_config(tmp_path / "pi-1", "pi-1", mqtt=mqtt)
        done = edged("fleet", "enroll", "-c", str(box), "--token", token, "--timeout", "20", cwd=tmp_path)
        assert done.returncode == 0, (done.stderr, (tmp_path / "signer.log").read_text()[-2000:])
        assert "enrolled as spiffe://home/node/pi-1" in done.stdout
        assert load_identity(str(tmp_path / "pi-1" / "state" / "identity")).node == "pi-1"
        # The same token again (say, copied to a second box): refused, and that box has no certificate.
        other = box_config(tmp_path / "pi-2", "pi-1", mqtt=mqtt)
        used = edged("fleet", "enroll", "-c", str(other), "--token", token, "--timeout", "20", cwd=tmp_path)
        assert used.returncode == 1 and "already used" in used.stderr
        assert not (tmp_path / "pi-2" / "state" / "identity" / "node.crt").exists()
        wrong = edged(
            "fleet", "enroll", "-c", str(other), "--token", token[:-3] + "xyz", "--timeout", "20", cwd=tmp_path
        )
        assert wrong.returncode == 1 and "wrong join token" in wrong.stderr
        log = (tmp_path / "signer.log").read_text()
        assert '"event":"ca.issued"' in log and '"event":"ca.refused"' in log
    finally:
        signer.terminate()
        signer.wait(10)


# -- an intermediate CA ------------------------------------------------------------------------------------


def test_an_intermediate_ca_issues_certificates_that_verify_in_tls_and_in_seals(tmp_path):
    """`edged fleet ca intermediate`: a CA signed by the root with path length 0; the leaves it signs carry it
    and verify against the root's bundle (TrustBundle, OpenSSL in a mutual handshake, a sealed message)."""
    import asyncio

    from test_identity import handshake

    from edged.cloud.signing import Seals
    from edged.identity import IdentityFiles
    from edged.identity.signer import load_ca
    from edged.identity.trust import path_length

    assert edged("fleet", "ca", "init", "--fleet", "home", "--dir", "root", cwd=tmp_path).returncode == 0
    made = edged("fleet", "ca", "intermediate", "--root", "root", "--dir", "site", "--days", "90", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    site = load_ca(str(tmp_path / "site"))
    assert (site.fleet, path_length(site.cert), site.bundle_pem) == ("home", 0, (tmp_path / "root/ca.pem").read_bytes())
    # Offline, with the command: the certificate file holds the leaf, then the intermediate.
    config = box_config(tmp_path / "box", "pi-1")
    assert edged("fleet", "enroll", "-c", str(config), cwd=tmp_path).returncode == 0
    identity = tmp_path / "box" / "state" / "identity"
    signed = edged("fleet", "ca", "sign", str(identity / "node.csr"), "--dir", "site", "-o", "pi-1.crt", cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    done = edged("fleet", "enroll", "-c", str(config), "--cert", "pi-1.crt", "--ca", "root/ca.pem", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ident = load_identity(str(identity))
    assert [c.subject for c in ident.chain] == [ident.chain[0].subject, site.cert.subject]
    # Online, as `edged fleet ca serve` answers: the same chain.
    _, answer = decide(site, enroll_request(site.tokens.add(None, 3600), "pi-2").encode())
    assert answer.error is None and answer.cert.count("BEGIN CERTIFICATE") == 2
    assert answer.ca == site.bundle_pem.decode()
    # A node the root signed directly and the one the intermediate signed: mutual TLS names both.
    root = load_ca(str(tmp_path / "root"))
    direct = box_config(tmp_path / "direct", "pi-3")
    assert edged("fleet", "enroll", "-c", str(direct), cwd=tmp_path).returncode == 0
    csr = tmp_path / "direct" / "state" / "identity" / "node.csr"
    assert edged("fleet", "ca", "sign", str(csr), "--dir", "root", "-o", "pi-3.crt", cwd=tmp_path).returncode == 0
    out = edged("fleet", "enroll", "-c", str(direct), "--cert", "pi-3.crt", "--ca", "root/ca.pem", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    a, b = IdentityFiles(str(identity)), IdentityFiles(str(tmp_path / "direct" / "state" / "identity"))
    assert asyncio.run(handshake(a, b)) == (("home", "pi-3"), ("home", "pi-1"))
    assert asyncio.run(handshake(b, a)) == (("home", "pi-1"), ("home", "pi-3"))
    # Seals: the chain travels with the message and is verified up to the root.
    sender, receiver = Seals(a, skew=20), Seals(b, skew=20)
    assert receiver.open("t", sender.seal("t", b"hi")) == (("home", "pi-1"), b"hi")
    assert root.chain_pem == b""


def test_intermediates_are_confined_to_their_fleet_and_to_one_level(tmp_path):
    """A leaf signed by an intermediate of another fleet's root is refused; so is one under an intermediate's
    own sub-CA (path length 0), by TrustBundle and by OpenSSL; an intermediate cannot be made from one."""
    import asyncio
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    from test_identity import handshake

    from edged.errors import IdentityError
    from edged.identity import IdentityFiles
    from edged.identity.files import write_file
    from edged.identity.issue import cert_pem, create_intermediate, key_pem, sign_csr
    from edged.identity.signer import init_intermediate, load_ca

    home = init_ca(str(tmp_path / "home"), "home", 30)
    init_ca(str(tmp_path / "office"), "office", 30)
    office_site = init_intermediate(str(tmp_path / "office-site"), str(tmp_path / "office"), 30)
    home_site = init_intermediate(str(tmp_path / "home-site"), str(tmp_path / "home"), 30)
    with pytest.raises(IdentityError, match="signed by the root"):
        init_intermediate(str(tmp_path / "deeper"), str(tmp_path / "home-site"), 30)
    bundle = TrustBundle.from_pem(home.bundle_pem)

    def enroll(folder: Path, ca_key, chain: list, node: str, fleet: str = "home") -> IdentityFiles:
        key = generate_key()
        leaf = sign_csr(make_csr(key, fleet, node), ca_key, chain[0])
        files = IdentityFiles(str(folder))
        os.makedirs(folder, exist_ok=True)
        write_file(files.key, key_pem(key), 0o600)
        write_file(files.cert, cert_pem(leaf, *chain), 0o644)
        write_file(files.ca, home.bundle_pem, 0o644)
        return files

    ok = enroll(tmp_path / "ok", home_site.key, [home_site.cert], "pi-ok")
    assert bundle.verify(list(load_identity(ok.dir).chain)) == ("home", "pi-ok")
    # Another fleet's intermediate (its root is not trusted here, nor could it issue for `home`).
    foreign = enroll(tmp_path / "foreign", office_site.key, [office_site.cert], "pi-x", fleet="office")
    with pytest.raises(IdentityError, match="not issued by a CA of the trust bundle"):
        bundle.verify(list(load_identity(foreign.dir).chain))
    assert asyncio.run(handshake(ok, foreign)) == (None, None)
    # A sub-CA forged under the intermediate (make it by hand: the tools refuse), then a leaf under it.
    now = dt.datetime.now(dt.timezone.utc)
    sub_key = generate_key()
    sub = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sub")]))
        .issuer_name(home_site.cert.subject)
        .public_key(sub_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://home")]), critical=False)
        .sign(home_site.key, hashes.SHA256())
    )
    deep = enroll(tmp_path / "deep", sub_key, [sub, home_site.cert], "pi-deep")
    with pytest.raises(IdentityError, match=r"may have 0 CA\(s\) under it"):
        bundle.verify(list(load_identity(deep.dir).chain))
    assert asyncio.run(handshake(ok, deep)) == (None, None)
    with pytest.raises(IdentityError, match="path length 0"):
        create_intermediate(home_site.key, home_site.cert)
    assert load_ca(str(tmp_path / "home-site")).chain_pem == cert_pem(home_site.cert)

"""Bearer JWTs (edged/jwt_auth.py) through `Access.identify`: real keys, real signatures, real PyJWT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from edged.access import ADMIN, CALL, READ, WRITE, Access, AccessConfig
from edged.config import TenantConfig
from edged.document import Doc, Table
from edged.errors import CallError, ConfigError
from edged.http.message import Request
from edged.jwt_auth import JwtConfig, load_jwt

ISSUER, AUDIENCE = "https://id.example", "edged"
TENANTS = {"default": TenantConfig("default", open_on_loopback=True)}
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def jwk(key, kid: str) -> dict:
    algorithm = {rsa.RSAPrivateKey: RSAAlgorithm, ec.EllipticCurvePrivateKey: ECAlgorithm}
    algo = next((a for t, a in algorithm.items() if isinstance(key, t)), OKPAlgorithm)
    return {**json.loads(algo.to_jwk(key.public_key())), "kid": kid}


def claims(**over) -> dict:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "lamps", "tenant": "garden", "iat": now, "exp": now + 300, **over}


def token(key, kid: str | None, alg: str = "RS256", **over) -> str:
    return jwt.encode(claims(**over), key, algorithm=alg, headers=None if kid is None else {"kid": kid})


def req(tok: str | bytes) -> Request:
    value = tok.encode() if isinstance(tok, str) else tok
    return Request(
        "GET", "/svc/x/", "/svc/x/", "", "1.1", [(b"authorization", b"Bearer " + value)], b"", "10.0.0.9", True
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def access(tmp_path: Path, keys: list[dict], **cfg) -> Access:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": keys}))
    table = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json", "leeway": "5s", **cfg}
    config = load_jwt(Table(Doc("edged.toml"), table, ("access", "jwt")), lambda p: str(tmp_path / p))
    return Access(AccessConfig(anonymous="none", jwt=config), TENANTS)


def refused(a: Access, tok: str | bytes) -> str:
    with pytest.raises(CallError) as err:
        a.identify(req(tok))
    assert err.value.status == 401 and err.value.code == "unauthorized"
    return str(err.value.detail).lower()


def test_a_valid_token_names_tenant_app_and_rights(tmp_path: Path) -> None:
    a = access(tmp_path, [jwk(RSA_KEY, "rsa1"), jwk(EC_KEY, "ec1"), jwk(ED_KEY, "ed1")])
    for key, kid, alg in ((RSA_KEY, "rsa1", "RS256"), (EC_KEY, "ec1", "ES256"), (ED_KEY, "ed1", "EdDSA")):
        ident = a.identify(req(token(key, kid, alg)))
        assert (ident.id, ident.tenant, ident.kind, ident.by_token) == ("garden/lamps", "garden", "jwt", True)
        assert ident.rights == {READ, CALL}
    assert a.identify(req(token(RSA_KEY, "rsa1", roles=["write"]))).rights == {READ, CALL, WRITE}
    assert a.identify(req(token(RSA_KEY, "rsa1", roles="admin"))).rights == {READ, CALL, WRITE, ADMIN}


def test_expired_wrong_issuer_audience_unknown_kid_and_missing_claims(tmp_path: Path) -> None:
    a = access(tmp_path, [jwk(RSA_KEY, "rsa1")])
    now = int(time.time())
    assert "expired" in refused(a, token(RSA_KEY, "rsa1", exp=now - 60))
    a.identify(req(token(RSA_KEY, "rsa1", exp=now - 2)))  # within the 5 s leeway
    assert "issuer" in refused(a, token(RSA_KEY, "rsa1", iss="https://evil.example"))
    assert "audience" in refused(a, token(RSA_KEY, "rsa1", aud="someone-else"))
    assert "unknown key id 'rsa9'" in refused(a, token(RSA_KEY, "rsa9"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "signature" in refused(a, token(other, "rsa1"))  # the right kid, another key
    assert "tenant" in refused(a, token(RSA_KEY, "rsa1", tenant="Not A Tenant"))
    no_exp = claims()
    del no_exp["exp"]
    assert "exp" in refused(a, jwt.encode(no_exp, RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"}))
    assert "not a jwt" in refused(a, "a.b.c")
    assert "longer than" in refused(a, "a." + "b" * 9000 + ".c")


def test_alg_none_and_hs_rs_confusion_never_verify(tmp_path: Path) -> None:
    rsa_jwk = jwk(RSA_KEY, "rsa1")
    secret = {"kty": "oct", "k": b64(b"s" * 32), "kid": "hmac1"}
    a = access(tmp_path, [rsa_jwk, secret], algorithms=["RS256", "HS256"])
    body = b64(json.dumps(claims()).encode())
    none = f"{b64(json.dumps({'alg': 'none', 'kid': 'rsa1'}).encode())}.{body}."
    assert "'none' is not accepted" in refused(a, none)
    # HS256 "signed" with the RSA public key as the HMAC secret, naming the RSA key's kid.
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64(json.dumps({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}).encode())
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert "is for rs256, the token says hs256" in refused(a, f"{head}.{body}.{b64(mac)}")
    # ... and an RS256 token cannot name the HMAC key either; the HMAC key signs its own tokens fine.
    assert "is for hs256" in refused(a, token(RSA_KEY, "hmac1"))
    assert a.identify(req(token(b"s" * 32, "hmac1", "HS256"))).id == "garden/lamps"
    # With HS256 not listed, the HMAC key is not even loaded.
    b = access(tmp_path, [rsa_jwk, secret])
    assert "'hs256' is not accepted" in refused(b, token(b"s" * 32, "hmac1", "HS256"))


def test_a_rotated_key_is_taken_from_the_jwks_file_without_a_restart(tmp_path: Path) -> None:
    a = access(tmp_path, [jwk(RSA_KEY, "k1")])
    old = token(RSA_KEY, "k1")
    assert a.identify(req(old)).id == "garden/lamps"
    new_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(RSA_KEY, "k1"), jwk(new_key, "k2")]}))
    st = os.stat(tmp_path / "jwks.json")
    os.utime(tmp_path / "jwks.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a visible change
    a._jwt._next_look = 0.0  # type: ignore[union-attr]  # (it looks at most once a second)
    assert a.identify(req(token(new_key, "k2", "ES256"))).id == "garden/lamps"
    # The old key is retired: its tokens, even one verified (and cached) before, are refused from then on.
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(new_key, "k2")]}))
    os.utime(tmp_path / "jwks.json", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    a._jwt._next_look = a._next_look = 0.0  # type: ignore[union-attr]
    assert "unknown key id 'k1'" in refused(a, old)
    # A half-written file during a rotation keeps the last good keys.
    (tmp_path / "jwks.json").write_text('{"keys": [')
    a._jwt._next_look = a._next_look = 0.0  # type: ignore[union-attr]
    assert a.identify(req(token(new_key, "k2", "ES256"))).id == "garden/lamps"


def test_verified_tokens_are_cached_until_they_expire(tmp_path: Path) -> None:
    a = access(tmp_path, [jwk(RSA_KEY, "rsa1")])
    verifier = a._jwt
    assert verifier is not None
    checks = []
    real = verifier.verify
    verifier.verify = lambda tok: checks.append(tok) or real(tok)  # type: ignore[method-assign]
    tok = token(RSA_KEY, "rsa1")
    for _ in range(5):
        assert a.identify(req(tok)).id == "garden/lamps"
    assert len(checks) == 1  # one signature check; the four others were a dictionary lookup
    short = token(RSA_KEY, "rsa1", exp=int(time.time()) - 1)  # expired, but within the leeway
    a.identify(req(short))
    a.identify(req(short))
    assert len(checks) == 3  # an expired token is never served from the cache


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    doc = Doc("edged.toml")
    (tmp_path / "bad.json").write_text('{"keys": [{"kty": "RSA", "n": "x"}]}')
    cases = [
        ({"issuer": ISSUER}, "give the keys"),
        ({"issuer": ISSUER, "keys": [{"kty": "OKP"}], "algorithms": ["EdDSA"]}, "not a usable JWK"),
        ({"issuer": ISSUER, "jwks_file": "missing.json"}, "cannot read"),
        ({"issuer": ISSUER, "jwks_file": "bad.json"}, "not a usable JWK"),
        ({"issuer": ISSUER, "keys": [], "algorithms": ["none"]}, "expected one of"),
    ]
    for table, words in cases:
        with pytest.raises(ConfigError) as err:
            load_jwt(Table(doc, table, ("access", "jwt")), lambda p: str(tmp_path / p))
        assert words in str(err.value), (table, err.value)
    inline = load_jwt(Table(doc, {"issuer": ISSUER, "keys": [jwk(ED_KEY, "e")]}, ("access", "jwt")), str)
    assert isinstance(inline, JwtConfig) and inline.keys[0]["kid"] == "e"

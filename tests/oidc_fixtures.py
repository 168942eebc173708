"""OIDC test fixtures: a real OIDC provider, and a local issuer whose keys the test controls.

`oidc_provider` (session) runs `oidc-provider-mock` (discovery, JWKS, RS256 ID tokens, a real
authorization-code flow) on a free 127.0.0.1 port in a thread. `.token(...)` drives the
provider's own login + token endpoints and returns the ID token it signed. The mock copies a
user's non-standard claims into the ID token *after* its own claims, so `exp`, `iat`, `nbf`,
`azp`, `groups`, `roles` … given to `.token()` end up in the signed token as given.

`LocalIssuer` / `local_issuer` serve discovery + JWKS from keys the test holds, count every
fetch, rotate keys, go "down", and sign anything (the attack battery needs tokens no real
provider would issue). Registered in tests/conftest.py:
`pytest_plugins = ["tests.oidc_fixtures"]`.
"""

from __future__ import annotations

import base64
import json
import secrets
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk as jose_jwk
from jose import jwt as jose_jwt

from addons.devkit.idp import DemoIdP


def b64url(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def identity_yaml_for(issuer: str, audience: str | list[str] = "agentgate",
                      **opts: Any) -> str:
    """An `identity:` rules fragment trusting one issuer (opts become issuer keys)."""
    entry: dict[str, Any] = {"issuer": issuer, "audience": audience}
    entry.update(opts)
    lines = ["identity:", "  required: true", "  issuers:"]
    first = True
    for k, v in entry.items():
        prefix = "    - " if first else "      "
        first = False
        lines.append(f"{prefix}{k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OIDCProvider(DemoIdP):
    """oidc-provider-mock in a thread (addons/devkit/idp.py), counting discovery and JWKS
    fetches and able to rotate its signing key."""

    def __init__(self) -> None:
        super().__init__()
        self.port = self._server.server_port
        # count fetches of the discovery document and the JWKS (key-rotation tests)
        self.fetches = {"discovery": 0, "jwks": 0}
        self._storage: Any = None

        @self.app.before_request
        def _count() -> None:
            import flask
            self._storage = flask.g.get("oidc_provider_mock_storage", self._storage)
            if flask.request.headers.get("x-fixture-internal"):
                return
            if flask.request.path == "/jwks":
                self.fetches["jwks"] += 1
            elif flask.request.path == "/.well-known/openid-configuration":
                self.fetches["discovery"] += 1

    def start(self) -> OIDCProvider:
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self._thread.join(5)

    def rotate_key(self) -> str:
        """Replace the provider's signing key (the mock keeps one key); returns the new kid."""
        import joserfc.jwk
        if self._storage is None:  # populated by the first request the provider served
            self.current_kid()
        self._storage.jwk = joserfc.jwk.RSAKey.generate_key(private=True)
        return self.current_kid()

    def current_kid(self) -> str:
        req = urllib.request.Request(f"{self.issuer}/jwks",
                                     headers={"x-fixture-internal": "1"})  # not counted
        keys = json.load(_DIRECT.open(req, timeout=10))["keys"]
        return keys[0]["kid"]

    def identity_yaml(self, audience: str | list[str] = "agentgate", **opts: Any) -> str:
        return identity_yaml_for(self.issuer, audience, **opts)


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OIDCProvider]:
    p = OIDCProvider().start()
    yield p
    p.stop()


# ---------------------------------------------------------------- local issuer
def new_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def public_der(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_jws(header: dict[str, Any], claims: dict[str, Any], key: Any,
             alg: str = "RS256") -> str:
    """Compact JWS signed directly with `cryptography` (fast: no PEM round trip)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    signing_input = f"{b64url(json.dumps(header))}.{b64url(json.dumps(claims))}".encode()
    digest = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[alg[2:]]
    if alg.startswith("RS"):
        sig = key.sign(signing_input, padding.PKCS1v15(), digest)
    else:
        r, s_ = decode_dss_signature(key.sign(signing_input, ec.ECDSA(digest)))
        size = (key.curve.key_size + 7) // 8
        sig = r.to_bytes(size, "big") + s_.to_bytes(size, "big")
    return f"{signing_input.decode()}.{b64url(sig)}"


def public_jwk(key: Any, kid: str, alg: str = "RS256") -> dict[str, Any]:
    d = jose_jwk.construct(public_pem(key), alg).to_dict()
    d.update(kid=kid, use="sig", alg=alg)
    return d


class LocalIssuer:
    """Discovery + JWKS served from keys the test holds; every fetch counted."""

    def __init__(self, audience: str = "agentgate",
                 tls: tuple[Any, Any] | None = None) -> None:
        """`tls=(cert_pem_path, key_pem_path)` serves https instead of http."""
        self.audience = audience
        self.keys: dict[str, tuple[Any, str]] = {}  # kid -> (private key, alg)
        self.published: list[str] = []             # kids in the JWKS
        self.fetches = {"discovery": 0, "jwks": 0}
        self.down = False
        self.jwks_delay = 0.0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/.well-known/openid-configuration":
                    issuer.fetches["discovery"] += 1
                    body = {"issuer": issuer.issuer, "jwks_uri": issuer.jwks_uri}
                elif path == "/jwks":
                    issuer.fetches["jwks"] += 1
                    if issuer.jwks_delay:
                        time.sleep(issuer.jwks_delay)
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                if issuer.down:
                    self.send_error(503)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.issuer = f"{scheme}://127.0.0.1:{self.port}"
        self.jwks_uri = f"{self.issuer}/jwks"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name="local-issuer")
        self.kid = self.add_key()

    def start(self) -> LocalIssuer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_key(self, alg: str = "RS256", publish: bool = True, kid: str | None = None) -> str:
        key = new_ec_key() if alg.startswith("ES") else new_rsa_key()
        kid = kid or f"k-{secrets.token_hex(6)}"
        self.keys[kid] = (key, alg)
        if publish:
            self.published.append(kid)
        return kid

    def rotate(self, keep_old: bool = False) -> str:
        kid = self.add_key()
        if not keep_old:
            self.published = [kid]
        self.kid = kid
        return kid

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self.keys[k][0], k, self.keys[k][1])
                         for k in self.published]}

    def claims(self, sub: str = "agent-1", groups: list[str] | tuple[str, ...] = (),
               aud: Any = None, expires_in: int = 300, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        c: dict[str, Any] = {"iss": self.issuer, "sub": sub,
                             "aud": self.audience if aud is None else aud,
                             "iat": now, "exp": now + expires_in, "groups": list(groups),
                             "jti": secrets.token_hex(8)}
        c.update(extra)
        return {k: v for k, v in c.items() if v is not None}

    def token(self, sub: str = "agent-1", groups: list[str] | tuple[str, ...] = (),
              aud: Any = None, expires_in: int = 300, *, kid: str | None = None,
              headers: dict[str, Any] | None = None, **extra: Any) -> str:
        """A correctly signed token (by the current or the named key)."""
        return self.sign(self.claims(sub, groups, aud, expires_in, **extra), kid=kid,
                         headers=headers)

    def sign(self, claims: dict[str, Any], kid: str | None = None,
             headers: dict[str, Any] | None = None) -> str:
        kid = kid or self.kid
        key, alg = self.keys[kid]
        hdrs: dict[str, Any] = {"alg": alg, "typ": "JWT", "kid": kid}
        hdrs.update(headers or {})
        return sign_jws(hdrs, claims, key, alg)

    def identity_yaml(self, audience: str | list[str] | None = None, **opts: Any) -> str:
        return identity_yaml_for(self.issuer, audience or self.audience, **opts)


@pytest.fixture(scope="session")
def local_issuer() -> Iterator[LocalIssuer]:
    """A shared local issuer (don't rotate it or count its fetches: use `make_local_issuer`)."""
    li = LocalIssuer().start()
    yield li
    li.stop()


@pytest.fixture
def make_local_issuer() -> Iterator[Any]:
    started: list[LocalIssuer] = []

    def make(audience: str = "agentgate", tls: tuple[Any, Any] | None = None) -> LocalIssuer:
        li = LocalIssuer(audience, tls).start()
        started.append(li)
        return li

    yield make
    for li in started:
        li.stop()


def dedent(text: str) -> str:
    return textwrap.dedent(text)


# ---------------------------------------------------------------- the attack battery
def sign_raw(header: str | dict[str, Any], payload: str | dict[str, Any], key: Any) -> str:
    """Sign exact header/payload JSON texts with RS256 (for duplicate members, NaN, …)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    h = header if isinstance(header, str) else json.dumps(header)
    p = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = f"{b64url(h)}.{b64url(p)}"
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(sig)}"


def hmac_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes,
               alg: str = "HS256") -> str:
    import hashlib
    import hmac
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    h = dict(header, alg=alg)
    signing_input = f"{b64url(json.dumps(h))}.{b64url(json.dumps(claims))}"
    sig = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(sig)}"


def attack_tokens(issuer: LocalIssuer, other: LocalIssuer,
                  trusted_other_audience: str = "other-service",
                  bait_url: str | None = None) -> list[tuple[str, str]]:
    """(name, token) for every attack class in SECURITY.md. None may be accepted by a
    gateway trusting `issuer` (audience issuer.audience) and `other` (audience
    `trusted_other_audience`). `bait_url` (default: `other`'s JWKS) goes into jku/x5u
    headers: a test serves it from an untrusted LocalIssuer and asserts it is never fetched."""
    bait = bait_url or other.jwks_uri
    good = issuer.claims()
    kid = issuer.kid
    key = issuer.keys[kid][0]
    h = {"alg": "RS256", "kid": kid, "typ": "JWT"}
    attacker = new_rsa_key()
    valid = issuer.token()
    vh, vp, vs = valid.split(".")
    out: list[tuple[str, str]] = []

    def add(name: str, token: str) -> None:
        out.append((name, token))

    # alg=none, all casings, with and without a signature segment
    for alg in ("none", "None", "NONE", "nOnE"):
        unsigned = f"{b64url(json.dumps(dict(h, alg=alg)))}.{b64url(json.dumps(good))}"
        add(f"alg-{alg}-empty-sig", unsigned + ".")
        add(f"alg-{alg}-with-sig", unsigned + "." + vs)
    # stripped / null signature
    add("stripped-signature", f"{vh}.{vp}.")
    add("no-signature-segment", f"{vh}.{vp}")
    add("null-signature", f"{vh}.{vp}.{b64url(bytes(256))}")
    add("signature-of-other-token", f"{vh}.{b64url(json.dumps(dict(good, sub='admin')))}.{vs}")
    # HS/RS key confusion: the issuer's public key as an HMAC secret (PEM, DER, JWK)
    jwk_text = json.dumps(public_jwk(key, kid)).encode()
    for fmt, secret in (("pem", public_pem(key)), ("der", public_der(key)),
                        ("jwk", jwk_text)):
        for alg in ("HS256", "HS512"):
            add(f"key-confusion-{alg}-{fmt}", hmac_token(h, good, secret, alg))
    # kid injection
    for name, bad_kid in (("traversal", "../../../../../dev/null"),
                          ("sql", "x' UNION SELECT 'secret' --"),
                          ("unknown", "no-such-kid"),
                          ("url", "https://evil.example/key")):
        add(f"kid-{name}-attacker-key", jose_jwt.encode(good, private_pem(attacker).decode(),
                                                        "RS256", headers={"kid": bad_kid}))
        add(f"kid-{name}-hmac-empty", hmac_token({"kid": bad_kid}, good, b""))
    second = issuer.add_key()  # published too: kid names one key, signed by another
    add("kid-mismatch", jose_jwt.encode(good, private_pem(issuer.keys[second][0]).decode(),
                                        "RS256", headers={"kid": kid}))
    add("no-kid-several-keys", jose_jwt.encode(good, private_pem(key).decode(), "RS256"))
    # key-location headers: attacker key advertised in the token itself
    attacker_jwk = public_jwk(attacker, kid)
    for hdr, value in (("jku", bait), ("x5u", bait + "?x5u"),
                       ("jwk", attacker_jwk),
                       ("x5c", [base64.b64encode(public_der(attacker)).decode()])):
        add(f"header-{hdr}", jose_jwt.encode(good, private_pem(attacker).decode(), "RS256",
                                             headers={"kid": kid, hdr: value}))
    # time claims
    now = int(time.time())
    add("expired", issuer.sign(dict(good, exp=now - 3600, iat=now - 7200)))
    add("nbf-future", issuer.sign(dict(good, nbf=now + 3600)))
    add("iat-future", issuer.sign(dict(good, iat=now + 3600, exp=now + 7200)))
    add("missing-exp", issuer.sign({k: v for k, v in good.items() if k != "exp"}))
    add("missing-iat", issuer.sign({k: v for k, v in good.items() if k != "iat"}))
    add("exp-string", issuer.sign(dict(good, exp=str(now + 300))))
    add("exp-infinity-signed", sign_raw(
        h, json.dumps({k: v for k, v in good.items() if k != "exp"})[:-1]
        + ', "exp": Infinity}', key))
    # audience / issuer
    add("wrong-aud", issuer.sign(dict(good, aud="someone-else")))
    add("wrong-aud-list", issuer.sign(dict(good, aud=["a", "b"])))
    add("missing-aud", issuer.sign({k: v for k, v in good.items() if k != "aud"}))
    add("empty-aud", issuer.sign(dict(good, aud=[])))
    add("wrong-iss", issuer.sign(dict(good, iss="https://evil.example")))
    add("missing-iss", issuer.sign({k: v for k, v in good.items() if k != "iss"}))
    add("iss-trailing-slash", issuer.sign(dict(good, iss=issuer.issuer + "/")))
    add("missing-sub", issuer.sign({k: v for k, v in good.items() if k != "sub"}))
    # issuer mix-up: trusted issuer B's key for A's issuer, B's token for A's audience
    add("mixup-b-key-claims-a", other.sign(dict(good)))
    add("mixup-b-token-a-audience", other.sign(other.claims(aud=issuer.audience)))
    add("mixup-a-token-b-audience-as-b", issuer.sign(dict(good, iss=other.issuer,
                                                          aud=trusted_other_audience)))
    # crit
    add("crit-unknown", issuer.sign(good, headers={"crit": ["x-custom"], "x-custom": 1}))
    add("crit-exp", issuer.sign(good, headers={"crit": ["exp"]}))
    # size
    add("oversized", issuer.sign(dict(good, pad="A" * 9000)))
    add("oversized-unsigned", "a" * 100_000)
    # malformed
    add("garbage", "not-a-token")
    add("bad-base64", "@@@.###.$$$")
    add("bad-base64-payload", f"{vh}.!!!{vp}.{vs}")
    add("padded-base64", f"{vh}=.{vp}.{vs}")
    add("bad-json-header", f"{b64url('{not json')}.{vp}.{vs}")
    add("bad-json-payload", f"{vh}.{b64url('{not json')}.{vs}")
    add("payload-array", sign_raw(h, "[1, 2, 3]", key))
    add("payload-string", sign_raw(h, '"hello"', key))
    add("payload-number", sign_raw(h, "123", key))
    add("payload-null", sign_raw(h, "null", key))
    add("header-array", f"{b64url('[1]')}.{vp}.{vs}")
    add("duplicate-claim", sign_raw(h, json.dumps(good)[:-1] + ', "aud": "evil"}', key))
    add("duplicate-header-alg", sign_raw(json.dumps(h)[:-1] + ', "alg": "none"}',
                                         json.dumps(good), key))
    add("duplicate-dots", f"{vh}..{vp}.{vs}")
    add("leading-dot", f".{vh}.{vp}.{vs}")
    add("trailing-dot", f"{vh}.{vp}.{vs}.")
    add("jwe-five-parts", f"{vh}.{vp}.{vs}.{vs}.{vs}")
    add("non-ascii", f"{vh}.{vp}.{vs}\u00e9")
    add("alg-es256-with-rsa-key", jose_jwt.encode(good, private_pem(new_ec_key()).decode(),
                                                  "ES256", headers={"kid": kid}))
    add("alg-missing", f"{b64url(json.dumps({'kid': kid}))}.{vp}.{vs}")
    return out

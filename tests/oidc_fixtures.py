"""OIDC test fixtures: a real OIDC provider, and a local issuer whose keys the test controls.

`oidc_provider` (session) runs `oidc-provider-mock` (discovery, JWKS, RS256 ID tokens, a real
authorization-code flow) on a free 127.0.0.1 port in a thread. `.token(...)` drives the
provider's own login + token endpoints and returns the ID token it signed. The mock copies a
user's non-standard claims into the ID token *after* its own claims, so `exp`, `iat`, `nbf`,
`azp`, `groups`, `roles` … given to `.token()` end up in the signed token as given.

`LocalIssuer` / `local_issuer` serve discovery + JWKS from keys the test holds, count every
fetch, rotate keys, go "down", and sign anything (the attack battery needs tokens no real
provider would issue). Registered in tests/conftest.py by `pytest_plugins = ["oidc_fixtures"]`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.error import HTTPError

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk as jose_jwk
from jose import jwt as jose_jwt

# The mock provider refuses plain-HTTP OAuth endpoints unless this is set.
os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")


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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_NO_REDIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


class OIDCProvider:
    """oidc-provider-mock running in a thread on 127.0.0.1."""

    def __init__(self) -> None:
        import oidc_provider_mock
        import werkzeug.serving

        self.app = oidc_provider_mock.app()
        self._server = werkzeug.serving.make_server("127.0.0.1", 0, self.app, threaded=True)
        self.port = self._server.server_port
        self.issuer = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,),
                                        daemon=True, name="oidc-provider-mock")
        self._lock = threading.Lock()
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
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def token(self, sub: str = "agent-1", groups: list[str] | tuple[str, ...] = (),
              aud: str = "agentgate", expires_in: int = 300, **claims: Any) -> str:
        """A real ID token from the provider's authorization-code flow (client_id = aud)."""
        now = int(time.time())
        user_claims: dict[str, Any] = {"groups": list(groups), "iat": now,
                                       "exp": now + expires_in}
        user_claims.update(claims)
        user_claims = {k: v for k, v in user_claims.items() if v is not None}
        redirect = "http://127.0.0.1/callback"
        with self._lock:  # user claims are per subject: one login at a time
            req = urllib.request.Request(
                f"{self.issuer}/users/{urllib.parse.quote(sub, safe='')}",
                data=json.dumps(user_claims).encode(), method="PUT",
                headers={"content-type": "application/json"})
            _DIRECT.open(req, timeout=10).close()
            query = urllib.parse.urlencode({
                "client_id": aud, "redirect_uri": redirect, "response_type": "code",
                "scope": "openid", "state": secrets.token_hex(4)})
            try:
                resp = _NO_REDIRECT.open(urllib.request.Request(
                    f"{self.issuer}/oauth2/authorize?{query}",
                    data=urllib.parse.urlencode({"sub": sub}).encode()), timeout=10)
                raise AssertionError(f"provider did not redirect: {resp.status}")
            except HTTPError as e:
                if e.code != 302:
                    raise
                location = e.headers["location"]
            code = urllib.parse.parse_qs(urllib.parse.urlparse(location).query)["code"][0]
            resp = _DIRECT.open(urllib.request.Request(
                f"{self.issuer}/oauth2/token", data=urllib.parse.urlencode({
                    "grant_type": "authorization_code", "code": code, "client_id": aud,
                    "client_secret": "unused", "redirect_uri": redirect}).encode()),
                timeout=10)
            return json.load(resp)["id_token"]

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


def public_jwk(key: Any, kid: str, alg: str = "RS256") -> dict[str, Any]:
    d = jose_jwk.construct(public_pem(key), alg).to_dict()
    d.update(kid=kid, use="sig", alg=alg)
    return d


class LocalIssuer:
    """Discovery + JWKS served from keys the test holds; every fetch counted."""

    def __init__(self, audience: str = "agentgate") -> None:
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
        self.port = self._server.server_address[1]
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.jwks_uri = f"{self.issuer}/jwks"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="local-issuer")
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
        hdrs = {"kid": kid}
        hdrs.update(headers or {})
        return jose_jwt.encode(claims, private_pem(key).decode(), algorithm=alg,
                               headers=hdrs)

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

    def make(audience: str = "agentgate") -> LocalIssuer:
        li = LocalIssuer(audience).start()
        started.append(li)
        return li

    yield make
    for li in started:
        li.stop()


def dedent(text: str) -> str:
    return textwrap.dedent(text)

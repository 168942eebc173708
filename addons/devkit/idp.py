"""A real OIDC provider on 127.0.0.1 for the demo: oidc-provider-mock in a thread.

It serves discovery, JWKS and RS256-signed ID tokens through its real authorization-code
flow; `token()` logs a subject in and returns the ID token the provider signed, with the
extra claims (groups, exp …) set on the user first. `users` are offered as buttons on its
login form (a reviewer signing in to the reviewers' page), `register_client()` registers
an OAuth client (the page) through the provider's dynamic client registration.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
import urllib.parse
import urllib.request
from typing import Any
from urllib.error import HTTPError

# The mock provider refuses plain-HTTP OAuth endpoints unless this is set (loopback only).
os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_NO_REDIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


class DemoIdP:
    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 users: dict[str, dict[str, Any]] | None = None) -> None:
        import oidc_provider_mock
        import werkzeug.serving

        self.app = oidc_provider_mock.app(user_claims=[
            oidc_provider_mock.User(sub=sub, claims=dict(claims))
            for sub, claims in (users or {}).items()])
        self._server = werkzeug.serving.make_server(host, port, self.app, threaded=True)
        netloc = f"[{host}]" if ":" in host else host
        self.issuer = f"http://{netloc}:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,),
                                        daemon=True, name="oidc-provider-mock")
        self._lock = threading.Lock()

    def start(self) -> DemoIdP:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def register_client(self, redirect_uris: list[str], confidential: bool = True
                        ) -> dict[str, Any]:
        """Register an OAuth client (RFC 7591): its client_id (and client_secret when
        confidential, sent by HTTP Basic); only these redirect URIs are accepted for it."""
        body = {"redirect_uris": redirect_uris, "token_endpoint_auth_method":
                "client_secret_basic" if confidential else "none"}
        with _DIRECT.open(urllib.request.Request(  # noqa: S310 - the local provider
                f"{self.issuer}/oauth2/clients", data=json.dumps(body).encode(),
                method="POST", headers={"content-type": "application/json"}),
                timeout=10) as resp:
            return json.load(resp)

    def identity_yaml(self, audience: str = "agentgate") -> str:
        return (f"identity:\n  required: true\n  issuers:\n    - issuer: {self.issuer}\n"
                f"      audience: {audience}\n")

    def token(self, sub: str = "agent-1", groups: list[str] | tuple[str, ...] = (),
              aud: str = "agentgate", expires_in: int = 300, **extra: Any) -> str:
        """A real ID token from the provider's authorization-code flow (client_id = aud).

        The mock copies a user's claims into the ID token after its own, so `extra` claims
        (roles, exp, nbf, azp …; None drops one) end up signed as given."""
        now = int(time.time())
        claims: dict[str, Any] = {"groups": list(groups), "iat": now, "exp": now + expires_in}
        claims.update(extra)
        claims = {k: v for k, v in claims.items() if v is not None}
        redirect = "http://127.0.0.1/callback"
        with self._lock:  # user claims are per subject: one login at a time
            _DIRECT.open(urllib.request.Request(  # noqa: S310 - the local provider
                f"{self.issuer}/users/{urllib.parse.quote(sub, safe='')}",
                data=json.dumps(claims).encode(), method="PUT",
                headers={"content-type": "application/json"}), timeout=10).close()
            query = urllib.parse.urlencode({
                "client_id": aud, "redirect_uri": redirect, "response_type": "code",
                "scope": "openid", "state": secrets.token_hex(4)})
            try:
                _NO_REDIRECT.open(urllib.request.Request(  # noqa: S310
                    f"{self.issuer}/oauth2/authorize?{query}",
                    data=urllib.parse.urlencode({"sub": sub}).encode()), timeout=10)
                raise RuntimeError("the OIDC provider did not redirect after login")
            except HTTPError as e:
                if e.code != 302:
                    raise
                location = e.headers["location"]
            code = urllib.parse.parse_qs(urllib.parse.urlparse(location).query)["code"][0]
            resp = _DIRECT.open(urllib.request.Request(  # noqa: S310
                f"{self.issuer}/oauth2/token", data=urllib.parse.urlencode({
                    "grant_type": "authorization_code", "code": code, "client_id": aud,
                    "client_secret": "unused", "redirect_uri": redirect}).encode()),
                timeout=10)
            token = json.load(resp)["id_token"]
            # The claims stay on the user for its next login (a reviewer signing in to the
            # page as the same subject): keep who it is, drop this token's lifetime, else
            # that login's ID token would carry this token's (soon past) expiry.
            _DIRECT.open(urllib.request.Request(  # noqa: S310
                f"{self.issuer}/users/{urllib.parse.quote(sub, safe='')}",
                data=json.dumps({k: v for k, v in claims.items()
                                 if k not in ("iat", "exp", "nbf")}).encode(),
                method="PUT", headers={"content-type": "application/json"}),
                timeout=10).close()
            return token

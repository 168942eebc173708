"""OIDC login for the reviewers' page: authorization code + PKCE, verified ID token.

The gateway is the OIDC client (`approvals.web.client_id`). The login it starts carries a
random `state` (bound to the browser by a signed cookie naming a server-side login
record), a `nonce` and a PKCE S256 challenge; the callback exchanges the code with the
verifier and accepts the ID token only after the identity concern's verifier checked its
signature (the issuer's JWKS, shared with agents' tokens), issuer, expiry and audience
(= client_id), and the nonce matches. Groups come from the issuer's `groups_claim`.

Discovery and the token request run in a worker thread (stdlib urllib, no proxy, no
redirects, https except on loopback), like the identity concern's JWKS fetches. Nothing
here logs a code, a token or a secret.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from addons.approval.config import WebConfig
from addons.approval.web.session import PendingLogin
from addons.config.holder import RulesHolder
from addons.identity.config import IdentityConfig, IssuerConfig
from addons.identity.jwks import MAX_DOCUMENT_BYTES, FetchError, _check_url, fetch_json
from addons.identity.jwt import TokenError, TokenVerifier, parse_token

DISCOVERY_TTL = 3600.0
FETCH_TIMEOUT = 10.0


class LoginError(Exception):
    """A login that cannot go on; `reason` is safe to show (no code, token or secret)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


@dataclass(frozen=True)
class Provider:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        raise FetchError(f"redirect ({code}) refused")


def _post_form(url: str, form: dict[str, str], timeout: float, ca_file: str | None,
               auth: tuple[str, str] | None) -> tuple[int, Any]:
    """POST a form, read a JSON answer (blocking; call it from a thread)."""
    _check_url(url)
    handlers: list[Any] = [urllib.request.ProxyHandler({}), _NoRedirect()]
    if url.startswith("https:"):
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file \
            else ssl.create_default_context()
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    headers = {"accept": "application/json", "user-agent": "agentgate-reviewers/1",
               "content-type": "application/x-www-form-urlencoded"}
    if auth is not None:  # client_secret_basic (RFC 6749 2.3.1): form-encode, then base64
        pair = f"{urllib.parse.quote(auth[0], safe='')}:{urllib.parse.quote(auth[1], safe='')}"
        headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),  # noqa: S310 - scheme checked above
                                 headers=headers, method="POST")
    try:
        with urllib.request.build_opener(*handlers).open(req, timeout=timeout) as resp:
            status, data = resp.status, resp.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read(MAX_DOCUMENT_BYTES + 1)
    except (urllib.error.URLError, OSError, ssl.SSLError) as e:
        raise FetchError(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise FetchError("answer too large")
    try:
        return status, json.loads(data)
    except ValueError:
        return status, None


class OIDCLogin:
    def __init__(self, holder: RulesHolder | None) -> None:
        self.holder = holder
        self._providers: dict[str, tuple[float, Provider]] = {}

    # ------------------------------------------------------------ settings
    def settings(self) -> tuple[WebConfig, IssuerConfig]:
        rules = self.holder.rules if self.holder is not None else None
        approvals = getattr(rules, "approvals", None)
        web = getattr(approvals, "web", None)
        if not isinstance(web, WebConfig):
            raise LoginError("the reviewers' page has no login configured "
                             "(rules: approvals.web.client_id)", 503)
        identity = getattr(rules, "identity", None)
        issuers = identity.issuers if isinstance(identity, IdentityConfig) else ()
        if not issuers:
            raise LoginError("no token issuer is configured (rules: identity.issuers)", 503)
        if web.issuer is None:
            return web, issuers[0]
        for cfg in issuers:
            if cfg.issuer.rstrip("/") == web.issuer:
                return web, cfg
        raise LoginError(f"approvals.web.issuer {web.issuer} is not one of identity.issuers",
                         503)

    def _ca_file(self) -> str | None:
        try:
            from addons.identity.addon import state_for
        except ImportError:
            return None
        return state_for(self.holder).store.ca_file if self.holder is not None else None

    async def provider(self, issuer: IssuerConfig) -> Provider:
        cached = self._providers.get(issuer.issuer)
        if cached is not None and time.monotonic() - cached[0] < DISCOVERY_TTL:
            return cached[1]
        url = issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            doc = await asyncio.to_thread(fetch_json, url, FETCH_TIMEOUT, self._ca_file())
        except FetchError as e:
            raise LoginError(f"the identity provider cannot be reached ({e})", 503) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("issuer"), str) \
                or doc["issuer"].rstrip("/") != issuer.issuer.rstrip("/"):
            raise LoginError("the identity provider's discovery document names another "
                             "issuer", 503)
        ends = []
        for key in ("authorization_endpoint", "token_endpoint"):
            value = doc.get(key)
            try:
                ends.append(_check_url(value) if isinstance(value, str) else "")
            except FetchError:
                ends.append("")
            if not ends[-1]:
                raise LoginError(f"the identity provider's {key} is missing or not https",
                                 503)
        p = Provider(issuer.issuer, ends[0], ends[1])
        self._providers[issuer.issuer] = (time.monotonic(), p)
        return p

    # ------------------------------------------------------------ the flow
    @staticmethod
    def authorize_url(p: Provider, web: WebConfig, login: PendingLogin,
                      redirect_url: str) -> str:
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": web.client_id,
            "redirect_uri": redirect_url, "scope": " ".join(web.scopes),
            "state": login.state, "nonce": login.nonce,
            "code_challenge": login.challenge, "code_challenge_method": "S256"})
        sep = "&" if "?" in p.authorization_endpoint else "?"
        return p.authorization_endpoint + sep + query

    async def exchange(self, p: Provider, web: WebConfig, code: str, login: PendingLogin,
                       redirect_url: str) -> str:
        """The authorization code -> the ID token the provider signed (not yet verified)."""
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": redirect_url, "code_verifier": login.verifier,
                "client_id": web.client_id}
        secret = web.client_secret()
        if (web.client_secret_env or web.client_secret_file) and not secret:
            raise LoginError("the reviewers' page client secret is not available ("
                             + (f"${web.client_secret_env} is not set"
                                if web.client_secret_env else
                                f"file {web.client_secret_file} is unreadable or empty")
                             + ")", 503)
        auth = (web.client_id, secret) if secret else None
        try:
            status, doc = await asyncio.to_thread(_post_form, p.token_endpoint, form,
                                                  FETCH_TIMEOUT, self._ca_file(), auth)
        except FetchError as e:
            raise LoginError(f"the identity provider's token endpoint failed ({e})",
                             503) from None
        if status != 200 or not isinstance(doc, dict):
            err = doc.get("error") if isinstance(doc, dict) else None
            name = err if isinstance(err, str) and err.isascii() and len(err) < 64 else ""
            raise LoginError(f"the identity provider refused the login (HTTP {status}"
                             + (f", {name}" if name else "") + ")", 401)
        token = doc.get("id_token")
        if not isinstance(token, str) or not token:
            raise LoginError("the identity provider returned no ID token", 401)
        return token

    async def verify(self, web: WebConfig, issuer: IssuerConfig, id_token: str,
                     nonce: str) -> dict[str, Any]:
        """The reviewer's identity from a verified ID token for this client and nonce."""
        # Same checks and keys as agents' tokens, but the audience is the page's client;
        # max_lifetime is a rule for agents' bearer tokens, not for a one-use ID token.
        cfg = dataclasses.replace(issuer, audiences=(web.client_id,), azp=(), max_lifetime=0)
        verifier = TokenVerifier(IdentityConfig(issuers=(cfg,), cache_size=0),
                                 self._key_lookup())
        try:
            ident = await verifier.verify(id_token)
            claims = parse_token(id_token, cfg.max_token_bytes).claims
        except TokenError as e:
            status = 503 if e.status >= 500 else 401
            raise LoginError(f"ID token refused: {e.reason}", status) from None
        got = claims.get("nonce")
        if not isinstance(got, str) or got != nonce:
            raise LoginError("ID token refused: nonce does not match this login", 401)
        return ident

    def _key_lookup(self) -> Any:
        from addons.identity.addon import state_for
        if self.holder is None:
            raise LoginError("no rules loaded", 503)
        return state_for(self.holder).store.lookup

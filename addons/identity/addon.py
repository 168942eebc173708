"""The identity addon: prove who is calling before anything leaves.

Token sources (rules `identity.sources`):
- `proxy`: the proxy credential, on CONNECT and on plain-HTTP proxy requests —
  `Proxy-Authorization: Basic base64(agent:<token>)` (`HTTPS_PROXY=http://agent:<token>@gw`)
  or `Proxy-Authorization: Bearer <token>`;
- `bearer` / `x-api-key`: the inner request's `Authorization: Bearer <token>` or
  `x-api-key: <token>` for a declared upstream (so `OpenAI(api_key=<token>)` works).

A connection authenticated at CONNECT keeps its token in memory (keyed by the client
connection id, dropped on disconnect) and every request on it is re-verified (a cache hit
while the token is valid), so the first request after `exp` is refused. Such a request should
never happen in practice: SDK connection pools do not reconnect after a 401, so from
`exp - identity.retire_before` on the tunnel is *retired*: the requests it still carries are
served and answered with `Connection: close` (mitmproxy then closes the HTTP/1 connection after
the response). An idle tunnel is *not* closed then: a client may be sending its next request
at that very moment, and a connection closed under a request is an error the pool does not
retry; the next request is served and retires it. Only a tunnel still open at `exp` (idle all
through the margin), where any request would be refused anyway, is closed by a per-tunnel
asyncio timer once no request is in flight. The pool opens a new connection, through the
connector, with a fresh token (HTTP/2 has no `Connection` header: such a tunnel is closed at
`exp`). The verified identity
goes to `flow.metadata["identity"]` = {sub, iss, groups, roles, jti, token_hash, exp, source};
the token itself never does, and the header that carried it is removed at once.

Refusals: 407 + `Proxy-Authenticate` on CONNECT / plain proxy requests, 401 in the upstream's
dialect on inner requests, 403 naming the upstream when `allow_groups` / `allow_subjects`
exclude the caller, 503 when the issuer's keys were never loaded. The body says why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitmproxy import connection, ctx, exceptions, http

from addons.config.holder import RulesHolder
from addons.egress.config import Upstream
from addons.frame.guard import guarded, refuse
from addons.identity.config import IdentityConfig
from addons.identity.jwks import JwksStore
from addons.identity.jwt import TokenError, TokenVerifier, token_hash

if TYPE_CHECKING:
    from addons.config.loader import Rules

log = logging.getLogger("agentgate.identity")

STEP = "identity"
PROXY_CHALLENGE = ['Basic realm="agentgate"', 'Bearer realm="agentgate"']


class _State:
    """Verifier + JWKS caches shared by everything that verifies tokens for one holder."""

    def __init__(self) -> None:
        self.store = JwksStore()
        self.config: IdentityConfig | None = None
        self.verifier: TokenVerifier | None = None
        self._tasks: set[asyncio.Task] = set()

    def verifier_for(self, rules: Rules | None) -> TokenVerifier:
        if rules is None:
            raise TokenError("gateway has no valid rules loaded", "no_rules", 503)
        cfg = rules.identity
        if self.verifier is None or cfg is not self.config:
            if self.verifier is not None and cfg == self.config:
                self.config = cfg  # a reload that left the identity section as it was
                return self.verifier
            # New identity rules: keep JWKS of unchanged issuers, forget verified tokens
            # (audiences, issuers or claim mappings may have changed).
            self.store.update(cfg)
            self.config = cfg
            self.verifier = TokenVerifier(cfg, self.store.lookup)
            self._prefetch()
        return self.verifier

    def _prefetch(self) -> None:
        """Load new issuers' keys in the background, so the first request does not wait."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (CLI, unit tests): keys load on first use
        task = loop.create_task(self.store.prefetch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


_states: weakref.WeakKeyDictionary[RulesHolder, _State] = weakref.WeakKeyDictionary()


def state_for(holder: RulesHolder) -> _State:
    st = _states.get(holder)
    if st is None:
        st = _states[holder] = _State()
    return st


async def verify_token(holder: RulesHolder, token: str, key: str | None = None
                       ) -> dict[str, Any]:
    """Verify a token against the issuers in force; returns the identity dict
    {sub, iss, groups, roles, jti, token_hash, exp}. Raises TokenError (short `.reason`).
    `key`: token_hash(token.strip()), when the caller keeps it (a tunnel's)."""
    return await state_for(holder).verifier_for(holder.rules).verify(token.strip(), key)


# ---------------------------------------------------------------- token extraction
def proxy_token(headers: http.Headers) -> str | None:
    """The token in Proxy-Authorization (Basic password, or Bearer), None if absent."""
    value = headers.get("proxy-authorization")
    if value is None:
        return None
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer":
        if not rest:
            raise TokenError("empty Bearer proxy credential", "token_missing")
        return rest
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise TokenError("malformed Basic proxy credential") from None
        user, sep, password = decoded.partition(":")
        # http://agent:<token>@gw (password) — or http://<token>@gw (user name only)
        token = password if sep and password else user
        if not token:
            raise TokenError("empty proxy credential", "token_missing")
        return token
    raise TokenError("unsupported proxy credential scheme (use Basic with the token as "
                     "password, or Bearer)")


def inner_token(headers: http.Headers, sources: tuple[str, ...]) -> tuple[str, str] | None:
    """(token, header name) from the inner request, None if absent."""
    if "bearer" in sources and "authorization" in headers:
        scheme, _, rest = headers["authorization"].strip().partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return rest.strip(), "authorization"
    if "x-api-key" in sources and headers.get("x-api-key", "").strip():
        return headers["x-api-key"].strip(), "x-api-key"
    return None


def upstream_denial(up: Upstream | None, ident: dict[str, Any] | None) -> str | None:
    """Why this identity may not use this upstream (allow_groups / allow_subjects), or None."""
    if up is None or not (up.allow_groups or up.allow_subjects):
        return None
    if ident is None:
        return f"upstream {up.name!r} requires an identity token"
    if ident["sub"] in up.allow_subjects:
        return None
    if set(ident.get("groups", ())) & set(up.allow_groups):
        return None
    return (f"identity {ident['sub']!r} may not use upstream {up.name!r} "
            "(not in its allow_groups/allow_subjects)")


def _identity_meta(ident: dict[str, Any], source: str) -> dict[str, Any]:
    return {"sub": ident["sub"], "iss": ident["iss"], "groups": list(ident["groups"]),
            "roles": list(ident["roles"]), "jti": ident["jti"],
            "token_hash": ident["token_hash"], "exp": ident["exp"], "source": source}


@dataclass
class _Tunnel:
    """A client connection authenticated at CONNECT: its token and when to retire it."""
    token: str
    ident: dict[str, Any]
    active: set[str] = field(default_factory=set)  # flows in flight (requests, WebSockets)
    timer: asyncio.TimerHandle | None = None
    # token_hash of the token, computed once: every request of the tunnel verifies it again
    # (a cache hit, keyed by this hash)
    key: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = token_hash(self.token.strip())

    @property
    def exp(self) -> float:
        return float(self.ident["exp"])


# While an expired tunnel is still busy (a long stream), look again this often.
RETIRE_RECHECK = 1.0
_now = time.time  # wall clock, as token exp is (a seam for the unit tests)


class Identity:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder
        self.state = state_for(holder)
        # client connection id -> (token, identity) for tunnels authenticated at CONNECT.
        # The token stays in process memory only, to re-verify each request on the tunnel.
        self._conns: dict[str, _Tunnel] = {}

    def load(self, loader: Any) -> None:
        loader.add_option(
            "agentgate_identity_ca", str | None, os.environ.get("AGENTGATE_IDENTITY_CA") or None,
            "PEM CA bundle trusted when fetching https token issuers' discovery/JWKS "
            "(default: $AGENTGATE_IDENTITY_CA, else the system CAs).")

    def configure(self, updated: set[str]) -> None:
        if "agentgate_identity_ca" in updated:
            ca = ctx.options.agentgate_identity_ca
            if ca and not Path(ca).is_file():
                raise exceptions.OptionsError(f"agentgate_identity_ca: no such file: {ca}")
            self.state.store.ca_file = ca or None

    def running(self) -> None:
        # Build the verifier now (which loads the issuers' keys in the background) and on
        # every rules change, so the first request does not wait for the IdP.
        self.holder.on_change(self.state.verifier_for)  # also runs now if rules are loaded

    # ------------------------------------------------------------ helpers
    def _refuse(self, flow: http.HTTPFlow, err: TokenError, proxy: bool) -> None:
        if err.status == 503:
            refuse(flow, 503, f"token not verified: {err.reason}", err.code, STEP)
            return
        if proxy:
            refuse(flow, 407, f"proxy authentication failed: {err.reason}", err.code, STEP)
            flow.response.headers.set_all("Proxy-Authenticate", PROXY_CHALLENGE)
        else:
            refuse(flow, 401, f"authentication failed: {err.reason}", err.code, STEP,
                   headers={"WWW-Authenticate": 'Bearer realm="agentgate", '
                                                'error="invalid_token"'})
        log.info("agentgate: token refused on %s %s: %s", flow.request.method,
                 flow.request.pretty_host, err.reason)

    def _missing(self, cfg: IdentityConfig) -> TokenError:
        if not cfg.issuers:
            return TokenError("no token issuer is configured on this gateway "
                              "(rules: identity.issuers), so every request is refused",
                              "identity_not_configured")
        how = []
        if "proxy" in cfg.sources:
            how.append("as the proxy password (HTTPS_PROXY=http://agent:<token>@gateway)")
        if "bearer" in cfg.sources:
            how.append("as Authorization: Bearer <token>")
        if "x-api-key" in cfg.sources:
            how.append("as x-api-key")
        return TokenError("an OIDC token is required: send it " + " or ".join(how),
                          "token_missing")

    def _upstream(self, flow: http.HTTPFlow) -> Upstream | None:
        meta = flow.metadata.get("upstream")
        rules = self.holder.rules
        if rules is None or not isinstance(meta, dict):
            return None
        return rules.upstream_named(meta.get("name", ""))

    # ------------------------------------------------------------ hooks
    @guarded(STEP)
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        rules = self.holder.rules
        assert rules is not None  # RulesLoader refuses flows before rules exist
        cfg: IdentityConfig = rules.identity
        if cfg.required and not cfg.issuers:
            # Without credentials the tunnel is allowed so that the inner request gets a
            # readable 401 in the API's dialect; nothing is forwarded either way.
            if "proxy-authorization" in flow.request.headers:
                self._refuse(flow, self._missing(cfg), proxy=True)
            return
        if "proxy" not in cfg.sources:
            return
        try:
            token = proxy_token(flow.request.headers)
            if token is None:
                # The token may come on the inner request (OpenAI(api_key=<token>)).
                return
            ident = await verify_token(self.holder, token)
        except TokenError as err:
            if cfg.required:
                self._refuse(flow, err, proxy=True)
            return
        if flow.client_conn.connected:  # not if it closed while we fetched keys (no leak)
            old = self._conns.pop(flow.client_conn.id, None)
            if old is not None and old.timer is not None:
                old.timer.cancel()
            tunnel = self._conns[flow.client_conn.id] = _Tunnel(token, ident)
            self._schedule(flow.client_conn.id, tunnel, tunnel.exp)
        flow.metadata["identity"] = _identity_meta(ident, "proxy")
        del flow.request.headers["proxy-authorization"]

    @guarded(STEP)
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rules = self.holder.rules
        assert rules is not None
        cfg: IdentityConfig = rules.identity
        # Not inside a TLS tunnel: a plain-HTTP proxy request, answered with 407 + challenge.
        plain_proxy = not flow.client_conn.tls_established
        try:
            ident, source = await self._authenticate(flow, cfg)
        except TokenError as err:
            if cfg.required:
                self._refuse(flow, err, proxy=plain_proxy)
                return
            # Explicit opt-out (identity.required: false): an unverifiable credential (say a
            # dummy API key) just means "anonymous"; allow lists below still apply.
            ident, source = None, ""
        if ident is not None:
            flow.metadata["identity"] = _identity_meta(ident, source)
        else:
            flow.metadata.pop("identity", None)
        why = upstream_denial(self._upstream(flow), ident)
        if why is not None:
            refuse(flow, 403, why, "identity_not_allowed", STEP)
            log.info("agentgate: %s", why)

    async def _authenticate(self, flow: http.HTTPFlow, cfg: IdentityConfig
                            ) -> tuple[dict[str, Any] | None, str]:
        """(identity, source), (None, "") when no token was sent; raises TokenError."""
        headers = flow.request.headers
        if cfg.required and not cfg.issuers:
            raise self._missing(cfg)
        if "proxy" in cfg.sources and "proxy-authorization" in headers:
            token = proxy_token(headers)
            assert token is not None
            ident = await verify_token(self.holder, token)
            del headers["proxy-authorization"]
            return ident, "proxy"
        conn = self._conns.get(flow.client_conn.id)
        if conn is not None:
            try:
                return await verify_token(self.holder, conn.token, conn.key), "proxy"
            except TokenError as err:
                # A kept-alive tunnel whose token expired (or whose issuer was removed):
                # every further request on it is refused; the client must reconnect.
                raise TokenError(f"{err.reason} (the token given at CONNECT is no longer "
                                 "valid; reconnect with a fresh token)", err.code,
                                 err.status) from None
        found = inner_token(headers, cfg.sources)
        if found is None:
            if cfg.required:
                raise self._missing(cfg)
            return None, ""
        token, header = found
        ident = await verify_token(self.holder, token)
        del headers[header]
        return ident, "bearer" if header == "authorization" else header

    @guarded(STEP)
    def client_disconnected(self, client: connection.Client) -> None:
        tunnel = self._conns.pop(client.id, None)
        if tunnel is not None and tunnel.timer is not None:
            tunnel.timer.cancel()

    # ------------------------------------------------------------ tunnel retirement
    def _retire_before(self) -> int:
        rules = self.holder.rules
        return rules.identity.retire_before if rules is not None else 0

    def _retire_at(self, tunnel: _Tunnel) -> float:
        """Wall-clock time from which this tunnel is retired."""
        return tunnel.exp - self._retire_before()

    def _retiring(self, flow: http.HTTPFlow) -> bool:
        tunnel = self._conns.get(flow.client_conn.id)
        return tunnel is not None and _now() >= self._retire_at(tunnel)

    def _schedule(self, cid: str, tunnel: _Tunnel, when: float) -> None:
        """Run `_check_retire` at wall-clock `when` (never blocks; one timer per tunnel)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (unit tests of other hooks): nothing to close
        if tunnel.timer is not None:
            tunnel.timer.cancel()
        tunnel.timer = loop.call_later(max(0.0, when - _now()), self._check_retire, cid)

    def _check_retire(self, cid: str) -> None:
        """At the token's exp: close the tunnel once no request is in flight."""
        tunnel = self._conns.get(cid)
        if tunnel is None:
            return
        tunnel.timer = None
        now = _now()
        if now < tunnel.exp:  # the loop's clock ran ahead of the wall clock
            self._schedule(cid, tunnel, tunnel.exp)
            return
        if tunnel.active:
            # A request started before exp (a long stream) finishes; its response carries
            # Connection: close. Look again until the tunnel is idle.
            self._schedule(cid, tunnel, now + RETIRE_RECHECK)
            return
        self._conns.pop(cid, None)
        self._close(cid, "its token expired")

    @staticmethod
    def _close(cid: str, why: str) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = getattr(proxyserver, "connections", {}).get(cid)
        if handler is None:
            return
        log.info("agentgate: closing idle tunnel from %s: %s (the client reconnects "
                 "with a fresh token)", handler.client.peername, why)
        handler.close_connection(handler.client)

    def _close_if_retiring(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or flow.websocket is not None or not self._retiring(flow):
            return
        if flow.request.http_version in ("HTTP/1.1", "HTTP/1.0"):
            # HTTP/1 only: Connection is not a valid HTTP/2 header (closed when idle instead).
            resp.headers["connection"] = "close"

    @guarded(STEP, skip_answered=False)
    def request(self, flow: http.HTTPFlow) -> None:
        tunnel = self._conns.get(flow.client_conn.id)
        if tunnel is not None:
            tunnel.active.add(flow.id)

    @guarded(STEP, skip_answered=False)
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Set before the head is sent, so a streamed response carries it too.
        self._close_if_retiring(flow)

    @guarded(STEP, skip_answered=False)
    def response(self, flow: http.HTTPFlow) -> None:
        # Also the answers of the gateway itself (refusals, approvals) that skip responseheaders.
        self._close_if_retiring(flow)
        if flow.websocket is None:
            self._finished(flow)

    @guarded(STEP, skip_answered=False)
    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    @guarded(STEP, skip_answered=False)
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        tunnel = self._conns.get(flow.client_conn.id)
        if tunnel is not None:
            tunnel.active.discard(flow.id)

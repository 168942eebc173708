"""OAuth 2.0 client-credentials tokens (RFC 6749 section 4.4) the gateway obtains for an upstream.

An upstream whose `credential` has an `oauth:` block gets a bearer token from the operator's
token endpoint instead of a static secret. The agent never holds it (the gateway does, the
credentials addon injects it like any other credential). Pure: no mitmproxy import.

- `TokenCache.current(client)` is non-blocking (the wire substitution calls it synchronously):
  the cached token while it is still valid, else None.
- `TokenCache.ensure(client)` (async) makes sure there is one: it fetches in a worker thread
  (`asyncio.to_thread`, never on the event loop) when there is none, or refreshes ahead of
  expiry (inside `refresh_margin`) while requests keep using the still-valid token; one fetch
  per client at a time (others wait for it, bounded by the fetch's own timeout); after a
  failure, `RETRY_AFTER` seconds pass before the next attempt so a down token endpoint is not
  hammered. No token -> None: the caller refuses the request (fail closed).
- Bounded: the endpoint's answer is read up to MAX_RESPONSE bytes, within `timeout` seconds;
  the cache holds at most MAX_CLIENTS clients.
- Never logged: neither the client secret nor a token appears in a message or an error; the
  reason for a failure names the endpoint's HTTP status and OAuth `error` code only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from addons.config.schema import read_secret

log = logging.getLogger("agentgate.credentials")

MAX_RESPONSE = 64 * 1024
MAX_CLIENTS = 256
RETRY_AFTER = 2.0
DEFAULT_LIFETIME = 300  # when the endpoint omits expires_in: assume short, refresh often
MIN_LIFETIME = 5


@dataclass(frozen=True)
class OAuthClient:
    """Where and how the gateway gets a token. Holds no secret (only where to read it)."""

    token_url: str
    client_id: str
    secret_env: str | None = None
    secret_file: str | None = None
    scope: str | None = None
    audience: str | None = None
    resource: str | None = None
    auth_method: str = "basic"  # client_secret_basic | client_secret_post
    ca_file: str | None = None  # a private CA for the token endpoint
    timeout: float = 10.0
    refresh_margin: float = 60.0

    def secret(self) -> str | None:
        return read_secret(self.secret_env, self.secret_file)

    def describe(self) -> str:
        return f"OAuth client {self.client_id!r} at {self.token_url}"


class TokenError(Exception):
    """A token could not be obtained. The message is safe to show (no secret, no token)."""


@dataclass
class _Entry:
    token: str | None = None
    expires_at: float = 0.0
    refresh_at: float = 0.0
    previous: str | None = None  # the token it replaced: still scrubbed from logs
    inflight: asyncio.Future | None = None
    failed_at: float = 0.0
    reason: str = ""


def _safe_code(value: Any) -> str:
    """An OAuth error code as the endpoint sent it, only if it looks like one."""
    return value if isinstance(value, str) and re.fullmatch(r"[a-z_]{1,64}", value) else ""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx surfaces as an HTTPError


def fetch_token(client: OAuthClient) -> tuple[str, float]:
    """One client-credentials grant, blocking (run it in a thread). Returns (token, lifetime)."""
    secret = client.secret()
    if secret is None:
        src = f"env {client.secret_env}" if client.secret_env else f"file {client.secret_file}"
        raise TokenError(f"client secret not available ({src} is not set)")
    form = {"grant_type": "client_credentials"}
    headers = {"content-type": "application/x-www-form-urlencoded",
               "accept": "application/json"}
    if client.auth_method == "post":
        form.update(client_id=client.client_id, client_secret=secret)
    else:
        # RFC 6749 2.3.1: form-urlencode each part before joining them for Basic.
        pair = f"{urllib.parse.quote(client.client_id, safe='')}:" \
               f"{urllib.parse.quote(secret, safe='')}"
        headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    for key in ("scope", "audience", "resource"):
        value = getattr(client, key)
        if value:
            form[key] = value
    ctx = ssl.create_default_context(cafile=client.ca_file) if client.ca_file else \
        ssl.create_default_context()
    # The gateway's own proxy environment (if any) is not for this: straight to the endpoint.
    # No redirects either: urllib would carry the Basic credentials to wherever they point.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=ctx),
                                         _NoRedirect())
    # token_url is http(s) only (checked when the rules are parsed)
    req = urllib.request.Request(client.token_url, method="POST", headers=headers,  # noqa: S310
                                 data=urllib.parse.urlencode(form).encode())
    try:
        with opener.open(req, timeout=client.timeout) as resp:
            raw = resp.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as e:
        try:
            code = _safe_code(json.loads(e.read(MAX_RESPONSE)).get("error"))
        except Exception:  # noqa: BLE001 - any body: only the status is reported
            code = ""
        raise TokenError(f"token endpoint answered HTTP {e.code}"
                         + (f" ({code})" if code else "")) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TokenError(f"token endpoint unreachable ({type(reason).__name__})") from None
    if len(raw) > MAX_RESPONSE:
        raise TokenError("token endpoint answer too large")
    try:
        body = json.loads(raw)
    except ValueError:
        raise TokenError("token endpoint answer is not JSON") from None
    token = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token or len(token) > 16384 \
            or any(c in token for c in "\r\n\0"):
        raise TokenError("token endpoint answer has no usable access_token")
    ttype = body.get("token_type", "bearer")
    if not isinstance(ttype, str) or ttype.lower() != "bearer":
        raise TokenError("token endpoint answered a token type other than bearer")
    lifetime = body.get("expires_in", DEFAULT_LIFETIME)
    if isinstance(lifetime, str) and lifetime.isdigit():
        lifetime = int(lifetime)
    if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) \
            or lifetime < MIN_LIFETIME:
        raise TokenError("token endpoint answer has no usable expires_in")
    return token, float(lifetime)


class TokenCache:
    """Tokens per OAuth client, shared by every flow of the process."""

    def __init__(self, fetch: Any = fetch_token, clock: Any = time.monotonic) -> None:
        self._fetch, self._clock = fetch, clock
        self._lock = threading.Lock()
        self._entries: dict[OAuthClient, _Entry] = {}
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references

    def _entry(self, client: OAuthClient) -> _Entry:
        with self._lock:
            e = self._entries.get(client)
            if e is None:
                if len(self._entries) >= MAX_CLIENTS:
                    # rules churn: drop entries no request is waiting on
                    for k in [k for k, v in self._entries.items() if v.inflight is None]:
                        del self._entries[k]
                e = self._entries[client] = _Entry()
            return e

    def current(self, client: OAuthClient) -> str | None:
        """The token to send now, or None. Never blocks on the network."""
        with self._lock:
            e = self._entries.get(client)
            if e is None or e.token is None or self._clock() >= e.expires_at:
                return None
            return e.token

    def due(self, client: OAuthClient) -> bool:
        """Whether ensure() has work to do: no valid token, or one inside its refresh margin."""
        with self._lock:
            e = self._entries.get(client)
            return e is None or e.token is None or self._clock() >= e.refresh_at

    def known(self, client: OAuthClient) -> list[str]:
        """The current and previous token (for the log scrubber)."""
        with self._lock:
            e = self._entries.get(client)
            return [t for t in (e.token, e.previous) if t] if e else []

    def reason(self, client: OAuthClient) -> str:
        with self._lock:
            e = self._entries.get(client)
            return e.reason if e else ""

    def invalidate(self, client: OAuthClient, token: str | None = None) -> None:
        """Forget the token (the upstream refused it); the next request fetches a new one."""
        with self._lock:
            e = self._entries.get(client)
            if e is not None and e.token is not None and token in (None, e.token):
                e.previous, e.token, e.expires_at = e.token, None, 0.0

    async def ensure(self, client: OAuthClient) -> str | None:
        """A valid token, fetching or refreshing it off the event loop when needed."""
        e = self._entry(client)
        now = self._clock()
        valid = e.token is not None and now < e.expires_at
        if valid and now < e.refresh_at:
            return e.token
        if e.inflight is None:
            if now - e.failed_at < RETRY_AFTER:
                return e.token if valid else None
            e.inflight = asyncio.get_running_loop().create_future()
            task = asyncio.get_running_loop().create_task(self._refresh(client, e))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if valid:
            return e.token  # refresh ahead: keep using the current one meanwhile
        await asyncio.shield(e.inflight)
        return self.current(client)

    async def _refresh(self, client: OAuthClient, e: _Entry) -> None:
        fut = e.inflight
        started = self._clock()  # the token's lifetime counts from the request, not the answer
        try:
            token, lifetime = await asyncio.wait_for(
                asyncio.to_thread(self._fetch, client), client.timeout + 5)
        except Exception as exc:  # noqa: BLE001 - any failure: no token, reason kept
            reason = str(exc) if isinstance(exc, TokenError) else \
                f"token request failed ({type(exc).__name__})"
            with self._lock:
                e.failed_at, e.reason = self._clock(), reason
            log.warning("agentgate: %s: no token: %s", client.describe(), reason)
        else:
            with self._lock:
                if e.token is not None and e.token != token:
                    e.previous = e.token  # (after invalidate() it already is)
                e.token = token
                e.expires_at = started + lifetime
                # a margin never larger than half the lifetime, or every request refreshes
                e.refresh_at = e.expires_at - min(client.refresh_margin, lifetime / 2)
                e.reason, e.failed_at = "", 0.0
            log.info("agentgate: %s: token obtained, valid %ds", client.describe(),
                     int(lifetime))
        finally:
            e.inflight = None
            if fut is not None and not fut.done():
                fut.set_result(None)


TOKENS = TokenCache()

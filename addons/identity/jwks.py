"""JWKS discovery, caching and refresh for the configured token issuers.

No mitmproxy import. Fetches use stdlib urllib in a worker thread (`asyncio.to_thread`), so
the event loop never waits on an identity provider. Rules of the cache (SECURITY.md):
- keys come only from the issuer's JWKS (`jwks_uri`, or discovered from
  `{issuer}/.well-known/openid-configuration`, whose `issuer` must match exactly);
- an unknown `kid` triggers a refresh at most once per `jwks_refresh_interval` per issuer,
  and concurrent callers share one in-flight fetch (no refresh storm from forged kids);
- keys older than `jwks_max_age` are refreshed in the background while still used;
- a failed or empty fetch keeps the last good keys; when no keys were ever loaded, every
  token of that issuer is refused (503 `issuer_unavailable`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from addons.frame.hosts import is_loopback_host
from addons.identity.config import IdentityConfig, IssuerConfig
from addons.identity.jwt import TokenError, TokenVerifier, VerifyKey, parse_jwks, select_key

log = logging.getLogger("agentgate.identity")

MAX_DOCUMENT_BYTES = 1 << 20
NEVER_LOADED_RETRY = 2.0  # seconds between attempts while an issuer has never answered


class FetchError(Exception):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        # A redirect could move key retrieval to another host or to plain http.
        raise FetchError(f"redirect ({code}) refused")


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return url
    raise FetchError(f"refusing to fetch keys from non-https URL {url[:200]!r}")


def fetch_json(url: str, timeout: float, ca_file: str | None = None) -> Any:
    """GET a JSON document (blocking; call it from a thread)."""
    _check_url(url)
    handlers: list[Any] = [urllib.request.ProxyHandler({}), _NoRedirect()]
    if url.startswith("https:"):
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file \
            else ssl.create_default_context()
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, headers={"accept": "application/json",  # noqa: S310 - scheme checked above
                                               "user-agent": "agentgate-jwks/1"})
    try:
        with opener.open(req, timeout=timeout) as resp:
            if resp.status != 200:
                raise FetchError(f"HTTP {resp.status}")
            data = resp.read(MAX_DOCUMENT_BYTES + 1)
    except FetchError:
        raise
    except urllib.error.HTTPError as e:
        raise FetchError(f"HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"{type(e).__name__}: {reason}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise FetchError("document too large")
    try:
        return json.loads(data)
    except ValueError:
        raise FetchError("not JSON") from None


class IssuerKeys:
    """The key set of one issuer, with its refresh state."""

    def __init__(self, cfg: IssuerConfig, store: JwksStore) -> None:
        self.cfg = cfg
        self.store = store
        self.keys: dict[str | None, VerifyKey] | None = None  # None: never loaded
        self.jwks_uri: str | None = cfg.jwks_uri
        self.loaded_at = 0.0          # monotonic time of the last good fetch
        self.last_attempt = -1e18     # monotonic time of the last fetch attempt
        self.fetches = 0              # fetch attempts (documents requested: JWKS)
        self.last_error: str | None = None
        self._inflight: asyncio.Future[None] | None = None
        self._inflight_loop: asyncio.AbstractEventLoop | None = None

    async def get(self, kid: str | None) -> VerifyKey | None:
        now = time.monotonic()
        if self.keys is None:
            if now - self.last_attempt >= min(NEVER_LOADED_RETRY, self.cfg.jwks_refresh_interval):
                await self.refresh()
            elif self._running_here():
                await self._join()
            if self.keys is None:
                raise TokenError(f"issuer {self.cfg.label} keys unavailable (JWKS not loaded: "
                                 f"{self.last_error or 'no answer yet'})",
                                 "issuer_unavailable", 503)
        key = select_key(self.keys, kid)
        if key is None and kid is not None:
            if now - self.last_attempt >= self.cfg.jwks_refresh_interval:
                await self.refresh()
            elif self._running_here():
                await self._join()
            key = select_key(self.keys, kid)
        elif now - self.loaded_at >= self.cfg.jwks_max_age \
                and now - self.last_attempt >= self.cfg.jwks_refresh_interval:
            self._start_refresh()  # keep answering with the current keys meanwhile
        return key

    def _running_here(self) -> bool:
        return (self._inflight is not None and not self._inflight.done()
                and self._inflight_loop is asyncio.get_running_loop())

    async def _join(self) -> None:
        assert self._inflight is not None
        await asyncio.shield(self._inflight)

    def _start_refresh(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if self._running_here():
            assert self._inflight is not None
            return self._inflight
        self.last_attempt = time.monotonic()
        self._inflight_loop = loop
        self._inflight = loop.create_task(self._refresh())
        return self._inflight

    async def refresh(self) -> None:
        """Fetch now (one in-flight fetch shared by all callers); never raises."""
        await asyncio.shield(self._start_refresh())

    async def _refresh(self) -> None:
        self.fetches += 1
        try:
            keys, uri = await asyncio.to_thread(self._fetch_blocking)
        except Exception as e:  # noqa: BLE001 - a failed fetch keeps the last good keys
            self.last_error = str(e)[:200] or type(e).__name__
            kept = "keeping the last good keys" if self.keys else "no keys loaded yet"
            log.warning("agentgate: JWKS fetch for issuer %s failed (%s); %s",
                        self.cfg.label, self.last_error, kept)
            return
        self.keys, self.jwks_uri = keys, uri
        self.loaded_at = time.monotonic()
        self.last_error = None
        log.info("agentgate: loaded %d signing key(s) for issuer %s", len(keys), self.cfg.label)

    def _fetch_blocking(self) -> tuple[dict[str | None, VerifyKey], str]:
        timeout, ca = self.cfg.fetch_timeout, self.store.ca_file
        uri = self.jwks_uri
        if uri is None:
            url = self.cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = fetch_json(url, timeout, ca)
            if not isinstance(doc, dict):
                raise FetchError("discovery document is not a JSON object")
            if not isinstance(doc.get("issuer"), str) \
                    or doc["issuer"].rstrip("/") != self.cfg.issuer.rstrip("/"):
                # OIDC Discovery 4.3: the document must be for this very issuer.
                raise FetchError("discovery document names another issuer")
            uri = doc.get("jwks_uri")
            if not isinstance(uri, str):
                raise FetchError("discovery document has no jwks_uri")
            _check_url(uri)
        try:
            keys = parse_jwks(fetch_json(uri, timeout, ca))
        except FetchError:
            if self.cfg.jwks_uri is None:
                self.jwks_uri = None  # rediscover next time (the URI may have moved)
            raise
        except ValueError as e:
            raise FetchError(str(e)) from None
        if not keys:
            raise FetchError("JWKS holds no usable signing key")
        return keys, uri


class JwksStore:
    """Key sets of every configured issuer; survives rules reloads for unchanged issuers."""

    def __init__(self, ca_file: str | None = None) -> None:
        self.ca_file = ca_file
        self._issuers: dict[tuple[str, str | None], IssuerKeys] = {}

    def update(self, config: IdentityConfig) -> None:
        fresh: dict[tuple[str, str | None], IssuerKeys] = {}
        for cfg in config.issuers:
            k = (cfg.issuer, cfg.jwks_uri)
            entry = self._issuers.get(k)
            if entry is None:
                entry = IssuerKeys(cfg, self)
            else:
                entry.cfg = cfg
            fresh[k] = entry
        self._issuers = fresh

    def for_issuer(self, cfg: IssuerConfig) -> IssuerKeys:
        k = (cfg.issuer, cfg.jwks_uri)
        entry = self._issuers.get(k)
        if entry is None:
            entry = self._issuers[k] = IssuerKeys(cfg, self)
        return entry

    async def lookup(self, cfg: IssuerConfig, kid: str | None) -> VerifyKey | None:
        return await self.for_issuer(cfg).get(kid)

    async def prefetch(self) -> None:
        """Load every issuer's keys (at start-up, so the first request does not wait)."""
        await asyncio.gather(*(e.refresh() for e in self._issuers.values()
                               if e.keys is None))

    def status(self) -> list[dict[str, Any]]:
        return [{"issuer": e.cfg.issuer, "keys": len(e.keys or {}), "fetches": e.fetches,
                 "loaded": e.keys is not None, "error": e.last_error}
                for e in self._issuers.values()]


def make_verifier(config: IdentityConfig, store: JwksStore | None = None,
                  clock: Callable[[], float] = time.time) -> TokenVerifier:
    store = store or JwksStore()
    store.update(config)
    return TokenVerifier(config, store.lookup, clock)

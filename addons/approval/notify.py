"""Delivering approval notifications: the HTTP transport with bounded retries, and the
generic JSON webhook events (`approval.created`, `approval.voted`, `approval.decided`).

Notifications go out directly (never through the proxy) with tornado's HTTP client, the
one mitmproxy already ships. Every delivery runs in its own task with exponential backoff
and a bounded number of attempts: a slow or dead chat server never touches a held flow,
whose own timeout decides how long it waits. A webhook URL is treated as a secret (Slack
puts the token in the path): only its scheme and host appear in logs.

The Slack flavour (Block Kit messages with buttons, updates of the same message, the
interactive callback) lives in addons/approval/slack.py on top of this transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tornado import httpclient, simple_httpclient

from addons.approval.store import PendingApproval

log = logging.getLogger("agentgate.approval")

MAX_RESPONSE_BYTES = 256 * 1024  # chat APIs answer with small JSON; more is refused
# how long a stopping gateway waits for deliveries in flight (the holds' "cancelled"
# updates): long enough for a chat API's answer, short next to a supervisor's stop timeout
SHUTDOWN_GRACE = 3.0
USER_AGENT = "agentgate"


@dataclass(frozen=True)
class Retry:
    """How hard to try one delivery."""

    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 5.0
    ca_file: str | None = None


class DeliveryError(Exception):
    """One failed attempt; `problem` is safe to log (no URL path, no token)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


def safe_url(url: str) -> str:
    """scheme://host[:port] of a URL: what may be logged of a webhook address."""
    u = urllib.parse.urlsplit(url)
    return f"{u.scheme}://{u.hostname or '?'}" + (f":{u.port}" if u.port else "")


class Transport:
    """POST JSON (or a form) and read the bounded answer. One tornado client per loop."""

    def __init__(self) -> None:
        self._ssl: dict[str | None, ssl.SSLContext] = {}
        self._client: simple_httpclient.SimpleAsyncHTTPClient | None = None

    def _http(self) -> simple_httpclient.SimpleAsyncHTTPClient:
        if self._client is None:
            # force_instance: our own client, not the per-loop singleton mitmweb may share
            self._client = simple_httpclient.SimpleAsyncHTTPClient(
                force_instance=True, max_clients=20, max_body_size=MAX_RESPONSE_BYTES)
        return self._client

    async def _context(self, url: str, ca_file: str | None) -> ssl.SSLContext | None:
        if not url.lower().startswith("https:"):
            return None
        if ca_file not in self._ssl:
            # loading CA files is blocking file I/O: once per file, off the event loop
            self._ssl[ca_file] = await asyncio.to_thread(ssl.create_default_context,
                                                         cafile=ca_file)
        return self._ssl[ca_file]

    async def post(self, url: str, payload: dict[str, Any], *, timeout: float,
                   ca_file: str | None = None, headers: dict[str, str] | None = None
                   ) -> tuple[int, bytes]:
        """(status, body). Raises DeliveryError when no HTTP answer came back."""
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise DeliveryError("not an http(s) URL")
        hdrs = {"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT}
        hdrs.update(headers or {})
        req = httpclient.HTTPRequest(
            url, method="POST", body=json.dumps(payload).encode(), headers=hdrs,
            connect_timeout=timeout, request_timeout=timeout, follow_redirects=False,
            ssl_options=await self._context(url, ca_file), decompress_response=False)
        try:
            resp = await self._http().fetch(req, raise_error=False)
        except (TimeoutError, OSError, ssl.SSLError, httpclient.HTTPClientError, ValueError) as e:
            # HTTPClientError 599 is a timeout or a body over MAX_RESPONSE_BYTES; its text
            # never holds the URL
            raise DeliveryError(type(e).__name__ + (f" {e.code}" if isinstance(
                e, httpclient.HTTPClientError) else "")) from None
        return resp.code, resp.body or b""

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


async def post_json(url: str, payload: dict[str, Any], *, timeout: float,
                    ssl_context: ssl.SSLContext | None = None) -> int:
    """POST JSON once over a fresh client; returns the HTTP status (tests, one-off calls).
    Raises DeliveryError when nothing answered."""
    t = Transport()
    if ssl_context is not None:
        t._ssl[None] = ssl_context
    try:
        status, _ = await t.post(url, payload, timeout=timeout)
        return status
    finally:
        t.close()


Check = Callable[[int, bytes], str | None]


def http_ok(status: int, _body: bytes) -> str | None:
    """The default acceptance of an answer: any 2xx."""
    return None if 200 <= status < 300 else f"HTTP {status}"


class Notifier:
    """Deliveries with retries, each in its own task; a failure is logged, never raised.

    `still_wanted()` is asked before every retry (a reminder about a decided hold is
    pointless); `check(status, body)` says whether an answer counts as delivered (Slack's
    Web API answers 200 with {"ok": false} on errors). The task's result is the accepted
    answer's body, or None.
    """

    def __init__(self) -> None:
        self.transport = Transport()
        self._tasks: set[asyncio.Task] = set()
        self._last: dict[str, asyncio.Task] = {}  # order key -> its latest delivery
        self.sent = 0
        self.failed_attempts = 0

    def submit(self, url: str | Callable[[], str | None], payload: dict[str, Any], *,
               retries: int, backoff: float,
               max_backoff: float, timeout: float, ca_file: str | None = None,
               still_wanted: Callable[[], bool] = lambda: True, label: str = "",
               headers: dict[str, str] | None = None, check: Check = http_ok,
               order: str | None = None) -> asyncio.Task:
        """Deliver in the background; deliveries with the same `order` key go out one
        after the other (an approval's `created` before its `decided`). `url` may be a
        function reading it (an environment variable, a secret file): called off the loop."""
        retry = Retry(retries, backoff, max_backoff, timeout, ca_file)
        prev = self._last.get(order) if order else None

        async def run() -> bytes | None:
            if prev is not None and not prev.done():
                await asyncio.wait([prev])
            target = await asyncio.to_thread(url) if callable(url) else url
            if not target:
                log.error("agentgate: approval %s: notification webhook URL not available",
                          label or payload.get("approval_id", ""))
                return None
            return await self.deliver(target, payload, retry, still_wanted=still_wanted,
                                      label=label or str(payload.get("approval_id", "")),
                                      headers=headers, check=check)

        task = self.spawn(run())
        if order:
            self._last[order] = task
            task.add_done_callback(
                lambda t: self._last.pop(order, None) if self._last.get(order) is t else None)
        return task

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        self.transport.close()

    async def drain(self, grace: float = SHUTDOWN_GRACE) -> None:
        """The gateway stops: let deliveries in flight (and those they start) finish
        within `grace` seconds, then cancel the rest (a retry waiting out its backoff, an
        unanswered chat API) and close the transport. Never raises."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (left := [t for t in self._tasks if not t.done()]) \
                and (wait := deadline - loop.time()) > 0:
            await asyncio.wait(left, timeout=wait)
        if left:
            log.warning("agentgate: %d approval notification(s) not delivered within %.1fs "
                        "of stopping", len(left), grace)
        await self.close()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        self.transport.close()

    async def deliver(self, url: str, payload: dict[str, Any], retry: Retry, *,
                      still_wanted: Callable[[], bool] = lambda: True, label: str = "",
                      headers: dict[str, str] | None = None, check: Check = http_ok
                      ) -> bytes | None:
        where = safe_url(url)
        problem = "not tried"
        for attempt in range(retry.retries + 1):
            if attempt and not still_wanted():
                return None  # decided meanwhile: nobody needs the reminder any more
            try:
                status, body = await self.transport.post(url, payload, timeout=retry.timeout,
                                                         ca_file=retry.ca_file, headers=headers)
                bad = check(status, body)
                if bad is None:
                    self.sent += 1
                    return body
                problem = bad
            except DeliveryError as e:
                problem = e.problem
            except Exception as e:  # noqa: BLE001 - a surprise is one failed attempt, named
                problem = type(e).__name__  # by type only: its text may hold the URL
            self.failed_attempts += 1
            if attempt == retry.retries:
                break
            delay = min(retry.max_backoff, retry.backoff * (2 ** attempt))
            log.warning("agentgate: approval %s: notification to %s failed (%s); retry %d/%d "
                        "in %.1fs", label, where, problem, attempt + 1, retry.retries, delay)
            await asyncio.sleep(delay)
        log.error("agentgate: approval %s: notification to %s failed after %d attempts (%s)",
                  label, where, retry.retries + 1, problem)
        return None


# ---------------------------------------------------------------- generic JSON events
def event(kind: str, a: PendingApproval, link: str, now: float | None = None
          ) -> dict[str, Any]:
    """A plain JSON event for chat tools other than Slack: `approval.created`,
    `approval.voted` or `approval.decided`, with the masked summary (never the body)."""
    view = a.public(now)
    view.pop("preview", None)  # the full masked body stays on the page, not in chat logs
    return {"event": kind, "approval_id": a.id, "state": a.state, "link": link,
            "approval": view}

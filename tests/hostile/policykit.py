"""Helpers for the hostile policy/decoder tests: one gateway per test, raw bodies sent
through it with httpx, and what the stand-in upstream actually received."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Gateway

OPENAI = "https://api.openai.com"
ANTHROPIC = "https://api.anthropic.com"
RSS_PEAK_LIMIT_KB = 700 * 1024


def client(gw: Gateway) -> httpx.Client:
    return httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60)


def send(gw: Gateway, url: str, body: bytes | dict[str, Any], *,
         content_type: str = "application/json", **headers: str) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"content-type": content_type, "authorization": "Bearer sk-agent",
            "x-api-key": "sk-ant-agent", "anthropic-version": "2023-06-01"}
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    with client(gw) as c:
        return c.post(url, content=data, headers=hdrs)


def assert_refused(gw: Gateway, standin, url: str, body: bytes | dict[str, Any], *,
                   status: int | tuple[int, ...] = 403, rule: str | None = None,
                   what: str = "", **kw: Any) -> httpx.Response:
    """The request is answered by the gateway and the upstream received nothing."""
    standin.clear()
    r = send(gw, url, body, **kw)
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (what, r.status_code, r.text[:500])
    assert r.headers.get("x-agentgate-refused"), (what, r.text[:300])
    if rule is not None:
        assert rule in r.text, (what, r.text[:500])
    assert standin.requests == [], (what, "the upstream received it")
    return r


def assert_passes(gw: Gateway, standin, url: str, body: bytes | dict[str, Any],
                  **kw: Any) -> httpx.Response:
    standin.clear()
    r = send(gw, url, body, **kw)
    assert r.status_code == 200, r.text[:500]
    assert len(standin.requests) == 1
    return r


def peak_rss_kb(gw: Gateway) -> int:
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def chat(model: str = "gpt-4o-mini", text: str = "ping", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}

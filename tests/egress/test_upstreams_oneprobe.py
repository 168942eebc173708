"""Upstreams.requestheaders reads the Host/Upgrade/Connection headers in one pass and
remembers path verdicts (addons/egress/upstreams.py): the same values and the same
refusals as mitmproxy's `headers.get_all`/`get` and an uncached normalise + path_allowed.
"""

from __future__ import annotations

import itertools

from mitmproxy import http
from mitmproxy.test import tflow

from addons.egress import upstreams
from addons.egress.paths import PathError, normalise, path_allowed

HEADER_SETS = [
    [],
    [(b"Host", b"api.example.com")],
    [(b"host", b"a.example"), (b"HOST", b"b.example")],
    [(b"Upgrade", b"websocket"), (b"connection", b"Upgrade")],
    [(b"UPGRADE", b"h2c"), (b"upgrade", b"websocket"), (b"Connection", b"keep-alive"),
     (b"CONNECTION", b"upgrade")],
    [(b"Host", b"\xff\xfe.example"), (b"Upgrade", b"\xc3\xa9"), (b"Connection", b"")],
    [(b"X-Host", b"x"), (b"Hostx", b"y"), (b"upgrade-insecure-requests", b"1"),
     (b"Proxy-Connection", b"upgrade")],
    [(b"Connection", b"close"), (b"Connection", b"Upgrade"), (b"Host", b"")],
]


def test_one_pass_reads_what_mitmproxy_reads() -> None:
    for fields in HEADER_SETS:
        h = http.Headers(fields)
        got = upstreams._named(h)
        assert got == (h.get_all("host"), h.get("upgrade"), h.get("connection", "")), fields


PATHS = ["/v1/chat/completions", "/v1/chat/completions?api-version=1&key=sk-secret",
         "/v1/chat/completions#frag", "/v1/chat/completions/", "/v1//chat/completions",
         "/v1/chat/../models", "/v1/%2e%2e/models", "/v1/chat%2Fcompletions", "/v1/models/x",
         "/v1/models/x/y", "/v1/messages", "/openai/deployments/gpt/chat/completions",
         "/v1/chat/completions%00", "/v1/ch%61t/completions", "/v1/chat/compl%zzetions",
         "v1/chat/completions", "/v1/chat/completions?x=/../", "/mcp", "/mcp?session=1",
         "/v1/files/abc/content", "/" + "a" * 600, "/v1/" + "b" * 600 + "?q"]
UPSTREAM_PATHS = [None, ("/custom/*", "/v1/extra/**")]


def _reference(dialect: str, extra: tuple[str, ...] | None, raw: str
               ) -> tuple[int, str, str] | None:
    try:
        norm = normalise(raw)
    except PathError as e:
        return 400, "ambiguous_path", f"ambiguous request path refused: {e}"
    if not path_allowed(dialect, extra, norm):
        return 404, "path_not_allowed", f"{norm} is not a known {dialect} endpoint of " \
            "upstream 'u' (default-deny paths; allow it with paths:)"
    return None


def test_path_verdicts_match_an_uncached_check_twice_over() -> None:
    upstreams._path_verdict.cache_clear()
    from addons.egress.config import Upstream
    for _round, dialect, extra, raw in itertools.product(
            range(2), ("openai", "anthropic", "mcp", "webhook"), UPSTREAM_PATHS, PATHS):
        up = Upstream("u", ("h",), dialect, None, paths=extra)
        f = tflow.tflow()
        f.request.path = raw
        ok = upstreams.Upstreams._path_ok(f, up)
        want = _reference(dialect, extra, raw)
        assert ok is (want is None), (dialect, extra, raw)
        if want is not None:
            assert f.response is not None and f.response.status_code == want[0]
            assert f.metadata["refusal"]["code"] == want[1]
            assert f.metadata["refusal"]["message"] == want[2], raw


def test_the_query_never_reaches_the_cache_and_long_paths_are_not_kept(monkeypatch) -> None:
    from addons.egress.config import Upstream
    seen: list[str] = []
    real = upstreams._path_verdict

    def spy(dialect, extra, path):  # noqa: ANN001, ANN202
        seen.append(path)
        return real(dialect, extra, path)
    spy.__wrapped__ = real.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(upstreams, "_path_verdict", spy)
    for raw in PATHS:
        f = tflow.tflow()
        f.request.path = raw
        upstreams.Upstreams._path_ok(f, Upstream("u", ("h",), "openai", None))
    assert seen and not any("?" in p or "#" in p or "secret" in p for p in seen)
    monkeypatch.undo()
    for raw in PATHS:
        upstreams._path_verdict.cache_clear()
        f = tflow.tflow()
        f.request.path = raw
        upstreams.Upstreams._path_ok(f, Upstream("u", ("h",), "openai", None))
        assert upstreams._path_verdict.cache_info().currsize == (
            0 if len(raw.split("?")[0]) > upstreams.PATH_CACHE_MAX_CHARS else 1)

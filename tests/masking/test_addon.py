"""The masking addon on mitmproxy flows (taddons/tflow), with a fake detector set."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.masking.addon import Masking
from addons.masking.masker import Masker
from tests.masking.test_masker import FakeDetectors

UPSTREAMS = """
upstreams:
  - {name: openai, hosts: [api.openai.com], dialect: openai, restore: true}
  - {name: anthropic, hosts: [api.anthropic.com], dialect: anthropic}
  - {name: raw, hosts: [raw.example.com], dialect: generic, mask: false}
  - {name: hook, hosts: [hooks.example.com], dialect: webhook}
"""


def addon_for(tmp_path: Path, masking: str = "") -> Masking:
    (tmp_path / "rules.yaml").write_text(UPSTREAMS + masking)
    holder = RulesHolder(load_rules(tmp_path))
    m = Masking(holder)
    m._masker = Masker(FakeDetectors(), b"key", m.sessions)
    m._masker_cfg = holder.rules.masking
    return m


def flow(upstream: str, body: bytes | dict = b"", *, headers: dict | None = None,
         path: str = "/v1/chat/completions", sub: str | None = "alice") -> http.HTTPFlow:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"content-type": "application/json", **(headers or {})}
    req = tutils.treq(method=b"POST", path=path.encode(), host="api.example",
                      headers=http.Headers([(k.encode(), v.encode()) for k, v in hdrs.items()]),
                      content=content)
    f = tflow.tflow(req=req)
    dialect = {"openai": "openai", "anthropic": "anthropic"}.get(upstream, "generic")
    f.metadata["upstream"] = {"name": upstream, "dialect": dialect}
    if sub:
        f.metadata["identity"] = {"sub": sub}
    return f


def run(coro_or_none) -> None:
    if asyncio.iscoroutine(coro_or_none):
        asyncio.run(coro_or_none)


def chat(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def test_request_body_masked_and_findings_recorded(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("openai", chat("I am ann@example.com, card 4111 1111 1111 1111"))
    with taddons.context(m):
        m.requestheaders(f)
        run(m.request(f))
    assert f.response is None
    sent = json.loads(f.request.content)
    assert sent["messages"][0]["content"] == "I am [EMAIL_1], card [CREDIT_CARD_1]"
    assert f.metadata["findings"] == {"EMAIL": {"count": 1, "strategy": "placeholder"},
                                      "CREDIT_CARD": {"count": 1, "strategy": "placeholder"}}
    assert "ann" not in json.dumps(f.metadata)
    assert f.request.headers["content-length"] == str(len(f.request.content))


def test_gzip_request_sent_identity(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("openai", gzip.compress(json.dumps(chat("ann@example.com")).encode()),
             headers={"content-encoding": "gzip"})
    with taddons.context(m):
        run(m.request(f))
    assert "content-encoding" not in f.request.headers
    assert b"ann@" not in f.request.raw_content and b"[EMAIL_1]" in f.request.raw_content


def test_unchanged_body_keeps_its_bytes(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    raw = gzip.compress(b'{"model": "m", "messages": []}')
    f = flow("openai", raw, headers={"content-encoding": "gzip"})
    with taddons.context(m):
        run(m.request(f))
    assert f.request.raw_content == raw and f.request.headers["content-encoding"] == "gzip"
    assert "findings" not in f.metadata


def test_query_string_masked(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("hook", b"", path="/hook?to=ann%40example.com&x=1")
    with taddons.context(m):
        run(m.request(f))
    assert f.request.query["to"] == "[EMAIL_1]" and f.request.query["x"] == "1"


def test_mask_false_and_disabled_skip(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("raw", b"ann@example.com", headers={"content-type": "text/plain"})
    with taddons.context(m):
        run(m.request(f))
    assert f.request.content == b"ann@example.com"
    (tmp_path / "off").mkdir()
    m2 = addon_for(tmp_path / "off", "masking:\n  enabled: false\n")
    f2 = flow("hook", b"ann@example.com", headers={"content-type": "text/plain"})
    with taddons.context(m2):
        run(m2.request(f2))
    assert f2.request.content == b"ann@example.com"


@pytest.mark.parametrize("upstream,body,ctype,status,shape", [
    ("openai", b"{broken", "application/json", 400, "openai"),
    ("anthropic", b"\xff\xfe\x00\x01", "application/octet-stream", 415, "anthropic"),
    ("hook", b"x", "text/plain; charset=nonexistent-charset", 415, "generic"),
])
def test_unparseable_refused_in_dialect(tmp_path: Path, upstream, body, ctype, status,
                                        shape) -> None:
    m = addon_for(tmp_path)
    f = flow(upstream, body, headers={"content-type": ctype})
    with taddons.context(m):
        run(m.request(f))
    assert f.response is not None and f.response.status_code == status
    err = json.loads(f.response.content)
    if shape == "anthropic":
        assert err["type"] == "error" and err["error"]["code"] == "unmaskable_body"
    else:
        assert err["error"]["code"] == "unmaskable_body"


def test_unparseable_pass_text(tmp_path: Path) -> None:
    m = addon_for(tmp_path, "masking:\n  on_unparseable: pass_text\n")
    f = flow("hook", b"\xff\x00 ann@example.com", headers={"content-type": "application/x-bin"})
    with taddons.context(m):
        run(m.request(f))
    assert f.response is None and f.request.content == b"\xff\x00 [EMAIL_1]"


def test_too_large_refused_early_and_after_decoding(tmp_path: Path) -> None:
    m = addon_for(tmp_path, "masking:\n  max_body_bytes: 2048\n")
    f = flow("openai", b"x" * 10, headers={"content-length": "4096"})
    with taddons.context(m):
        m.requestheaders(f)
    assert f.response.status_code == 413
    bomb = gzip.compress(json.dumps(chat("a" * 10_000)).encode())
    f2 = flow("openai", bomb, headers={"content-encoding": "gzip"})
    with taddons.context(m):
        run(m.request(f2))
    assert f2.response.status_code == 413


def test_response_restored_for_same_identity_and_session_only(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("openai", chat("I am ann@example.com"), headers={"x-agent-session": "s1"})
    with taddons.context(m):
        run(m.request(f))
        answer = {"choices": [{"message": {"role": "assistant",
                                           "content": "hi [EMAIL_1], cc bob@example.com"}}]}
        f.response = tutils.tresp(content=json.dumps(answer).encode(),
                                  headers=http.Headers(content_type="application/json"))
        run(m.response(f))
        out = json.loads(f.response.content)["choices"][0]["message"]["content"]
        assert out == "hi ann@example.com, cc [EMAIL_2]"
        assert f.metadata["findings"]["EMAIL"]["count"] == 2
        # a new flow of the same session and identity: the map is still there
        g = flow("openai", chat("x"), headers={"x-agent-session": "s1"})
        run(m.request(g))
        g.response = tutils.tresp(content=json.dumps(answer).encode(),
                                  headers=http.Headers(content_type="application/json"))
        run(m.response(g))
        assert b"ann@example.com" in g.response.content
        # another identity using the same session id gets nothing back
        h = flow("openai", chat("x"), headers={"x-agent-session": "s1"}, sub="mallory")
        run(m.request(h))
        h.response = tutils.tresp(content=json.dumps(answer).encode(),
                                  headers=http.Headers(content_type="application/json"))
        run(m.response(h))
        assert b"ann@" not in h.response.content and b"[EMAIL_1]" in h.response.content


def test_no_restore_without_upstream_flag(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("anthropic", {"messages": [{"role": "user", "content": "ann@example.com"}]},
             path="/v1/messages")
    with taddons.context(m):
        run(m.request(f))
        f.response = tutils.tresp(content=b'{"content": [{"type": "text", "text": "[EMAIL_1]"}]}',
                                  headers=http.Headers(content_type="application/json"))
        run(m.response(f))
    assert b"[EMAIL_1]" in f.response.content


def test_sse_response_streamed_through_masker(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("openai", chat("ann@example.com"))
    with taddons.context(m):
        run(m.request(f))
        f.response = tutils.tresp(content=None, headers=http.Headers(
            content_type="text/event-stream", content_encoding="gzip", content_length="999"))
        m.responseheaders(f)
    assert callable(f.response.stream)
    assert "content-encoding" not in f.response.headers
    assert "content-length" not in f.response.headers
    assert f.response.headers["transfer-encoding"] == "chunked"
    events = "".join(
        f'data: {json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]})}\n\n'
        for p in ["write to [EMA", "IL_1] or eve@exa", "mple.com"]) + "data: [DONE]\n\n"
    raw = gzip.compress(events.encode())
    out = []
    for i in range(0, len(raw), 5):
        res = f.response.stream(raw[i:i + 5])
        assert isinstance(res, list) and b"" not in res
        out += res
    out += f.response.stream(b"")
    text = b"".join(out).decode()
    assert "eve@" not in text and "ann@example.com" in text  # restored (restore: true)
    assert f.metadata["findings"]["EMAIL"]["count"] == 2  # 1 in the request, 1 in the stream
    with taddons.context(m):
        run(m.response(f))  # the response hook leaves a streamed body alone


def test_sse_with_unknown_encoding_refused(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("openai", chat("x"))
    with taddons.context(m):
        run(m.request(f))
        f.response = tutils.tresp(content=None, headers=http.Headers(
            content_type="text/event-stream", content_encoding="x-custom"))
        m.responseheaders(f)
    assert f.response.status_code == 502
    assert f.response.stream(b"data: raw ann@example.com\n\n") == []
    body = f.response.stream(b"")
    assert b"unmaskable_body" in b"".join(body)


def test_stream_failure_aborts(tmp_path: Path) -> None:
    m = addon_for(tmp_path, "masking:\n  max_body_bytes: 1024\n")
    f = flow("openai", chat("x"))
    with taddons.context(m):
        run(m.request(f))
        f.response = tutils.tresp(content=None, headers=http.Headers(
            content_type="text/event-stream"))
        m.responseheaders(f)
    with pytest.raises(RuntimeError):
        f.response.stream(b"data: " + b"a" * 5000)


def test_binary_response_refused_502(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("hook", b"")
    with taddons.context(m):
        run(m.request(f))
        f.response = tutils.tresp(content=b"\xff\xfe\x00\x00",
                                  headers=http.Headers(content_type="image/png"))
        run(m.response(f))
    assert f.response.status_code == 502


def test_session_sources(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    a = flow("openai", chat("x"), headers={"x-agent-session": "h"})
    a.metadata["session"] = "rec"
    b = flow("openai", chat("x"), headers={"x-agent-session": "rec"})
    c = flow("openai", chat("x"))
    assert m._session(a) is m._session(b)  # recorder's session wins over the header
    assert m._session(c) is not m._session(a)


def test_large_or_mitmproxy_streamed_response_refused_never_passed(tmp_path: Path) -> None:
    m = addon_for(tmp_path, "masking:\n  max_body_bytes: 2048\n")
    for headers, preset_stream in (({"content-length": "999999"}, False), ({}, True)):
        f = flow("hook", b"")
        with taddons.context(m):
            run(m.request(f))
            f.response = tutils.tresp(content=None, headers=http.Headers(
                content_type="application/json", **{k.replace("-", "_"): v
                                                    for k, v in headers.items()}))
            f.response.stream = preset_stream  # as stream_large_bodies would set it
            m.responseheaders(f)
        assert f.response.status_code == 502
        assert f.response.stream(b'{"email": "ann@example.com"}') == []
        assert b"body_too_large" in b"".join(f.response.stream(b""))
        with taddons.context(m):
            run(m.response(f))  # left alone: already refused
        assert f.response.status_code == 502


def test_streamed_request_refused_and_not_streamed(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("openai", b"")
    f.request.stream = True  # stream_large_bodies
    with taddons.context(m):
        m.requestheaders(f)
    assert f.response.status_code == 413 and f.request.stream is False


def test_unmasked_sse_is_still_streamed(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("raw", b"")
    f.response = tutils.tresp(content=None, headers=http.Headers(
        content_type="text/event-stream"))
    with taddons.context(m):
        m.responseheaders(f)
    assert f.response.stream is True


def test_stream_findings_appear_only_when_found(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("anthropic", {"messages": []}, path="/v1/messages")
    with taddons.context(m):
        run(m.request(f))
        f.response = tutils.tresp(content=None, headers=http.Headers(
            content_type="text/event-stream"))
        m.responseheaders(f)
    f.response.stream(b'data: {"type": "ping"}\n\n')
    assert "findings" not in f.metadata
    f.response.stream(b'data: {"type": "x", "note": "ann@example.com"}\n\n')
    assert f.metadata["findings"] == {"EMAIL": {"count": 1, "strategy": "placeholder"}}


@pytest.mark.parametrize("enc", ["gzip", "br", "zstd", "deflate"])
def test_compressed_response_masked_and_sent_identity(tmp_path: Path, enc: str) -> None:
    import zlib

    import brotli
    import zstandard
    comp = {"gzip": gzip.compress, "br": brotli.compress, "deflate": zlib.compress,
            "zstd": zstandard.ZstdCompressor().compress}[enc]
    m = addon_for(tmp_path)
    f = flow("anthropic", {"messages": []}, path="/v1/messages")
    with taddons.context(m):
        run(m.request(f))
        f.response = tutils.tresp(
            content=comp(b'{"content": [{"type": "text", "text": "eve@example.com"}]}'),
            headers=http.Headers(content_type="application/json", content_encoding=enc))
        run(m.response(f))
    assert "content-encoding" not in f.response.headers
    assert json.loads(f.response.content)["content"][0]["text"] == "[EMAIL_1]"


# ---------------------------------------------------------------- restore vs the record
def test_restored_response_leaves_the_masked_body_for_the_recorder(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("openai", chat("I am ann@example.com"), headers={"x-agent-session": "r1"})
    answer = {"choices": [{"message": {"role": "assistant",
                                       "content": "hi [EMAIL_1], cc bob@example.com"}}]}
    with taddons.context(m):
        run(m.request(f))
        f.response = tutils.tresp(content=gzip.compress(json.dumps(answer).encode()),
                                  headers=http.Headers(content_type="application/json",
                                                       content_encoding="gzip"))
        run(m.response(f))
    assert json.loads(f.response.content)["choices"][0]["message"]["content"] == \
        "hi ann@example.com, cc [EMAIL_2]"
    kept = f.metadata["masked_response"]
    assert isinstance(kept, bytes)  # decoded, masked, before restore
    assert json.loads(kept)["choices"][0]["message"]["content"] == "hi [EMAIL_1], cc [EMAIL_2]"
    # nothing to restore, or no restore on the upstream: the agent's body is the record
    g = flow("openai", chat("x"), headers={"x-agent-session": "r2"})
    h = flow("anthropic", chat("ann@example.com"), path="/v1/messages")
    with taddons.context(m):
        for fl in (g, h):
            run(m.request(fl))
            fl.response = tutils.tresp(content=json.dumps(answer).encode(),
                                       headers=http.Headers(content_type="application/json"))
            run(m.response(fl))
    assert "masked_response" not in g.metadata and "masked_response" not in h.metadata
    assert b"[EMAIL_1]" in h.response.content


def test_restored_stream_leaves_the_masked_stream_for_the_recorder(tmp_path: Path) -> None:
    m = addon_for(tmp_path)
    f = flow("openai", chat("ann@example.com"))
    with taddons.context(m):
        run(m.request(f))
        f.response = tutils.tresp(content=None, headers=http.Headers(
            content_type="text/event-stream"))
        m.responseheaders(f)
    events = "".join(
        f'data: {json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]})}\n\n'
        for p in ["write to [EMA", "IL_1] or eve@exa", "mple.com"]) + "data: [DONE]\n\n"
    out = list(f.response.stream(events.encode()))
    assert "masked_response" not in f.metadata  # only complete at the end of the stream
    out += f.response.stream(b"")
    assert b"ann@example.com" in b"".join(out)
    kept = f.metadata["masked_response"]
    assert b"ann@" not in kept and b"eve@" not in kept
    assert b"[EMAIL_1]" in kept and b"[EMAIL_2]" in kept and b"[DONE]" in kept

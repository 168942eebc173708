"""Masking everywhere a value travels (issue 11, class 7), on mitmproxy flows with the real
detectors: request headers (except the pass list and credentials), URL path and query,
multipart names, response headers; the flow after the hook is what is forwarded/recorded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.masking.addon import Masking
from tests.masking.test_addon import UPSTREAMS

RAW = ["ann.lee", "4111", "536-22", "4519"]


def addon(tmp_path: Path, masking: str = "") -> Masking:
    (tmp_path / "rules.yaml").write_text(UPSTREAMS + masking)
    return Masking(RulesHolder(load_rules(tmp_path)))


def mkflow(path: str, headers: list[tuple[str, str]], body: bytes = b"{}",
           upstream: str = "openai") -> http.HTTPFlow:
    req = tutils.treq(method=b"POST", path=path.encode(), host="api.example",
                      headers=http.Headers([(k.encode(), v.encode()) for k, v in headers]),
                      content=body)
    f = tflow.tflow(req=req)
    f.response = None
    f.metadata["upstream"] = {"name": upstream, "dialect": "openai"}
    f.metadata["identity"] = {"sub": "alice"}
    return f


def run(m: Masking, f: http.HTTPFlow) -> None:
    m.requestheaders(f)
    r = m.request(f)
    if asyncio.iscoroutine(r):
        asyncio.run(r)


def clean(text: str) -> None:
    for v in RAW:
        assert v not in text, (v, text)


def test_request_headers_path_and_query_masked(tmp_path: Path) -> None:
    m = addon(tmp_path)
    f = mkflow("/v1/users/ann.lee%40example.com/4111/1111/1111/1111/x?q=536-22-4519",
               [("content-type", "application/json"), ("user-agent", "agent/1 4111"),
                ("x-note", "call ann.lee@example.com"), ("x-card", "4111-1111-1111-1111"),
                ("authorization", "Bearer tok"), ("openai-beta", "assistants=v2")])
    run(m, f)
    assert "refusal" not in f.metadata
    req = f.request
    clean(req.path)
    clean(json.dumps([[k, v] for k, v in req.headers.items(multi=True)
                      if k.lower() not in ("user-agent",)]))
    assert req.headers["x-note"] == "call [EMAIL_1]"
    # the pass list and credentials are left alone
    assert req.headers["user-agent"] == "agent/1 4111"
    assert req.headers["authorization"] == "Bearer tok"
    assert req.headers["openai-beta"] == "assistants=v2"
    assert req.path.startswith("/v1/users/%5BEMAIL_1%5D/")
    assert f.metadata["findings"]["EMAIL"]["count"] >= 2


def test_header_name_holding_a_value_is_dropped(tmp_path: Path) -> None:
    m = addon(tmp_path)
    f = mkflow("/v1/chat/completions", [("content-type", "application/json"),
                                        ("x-4111-1111-1111-1111", "1")])
    run(m, f)
    assert [k for k in f.request.headers if "4111" in k] == []


def test_headers_pass_is_configurable(tmp_path: Path) -> None:
    m = addon(tmp_path, "masking:\n  headers_pass: [X-Trace]\n")
    f = mkflow("/v1/chat/completions", [("x-trace", "ann.lee@example.com"),
                                        ("x-other", "ann.lee@example.com")])
    run(m, f)
    assert f.request.headers["x-trace"] == "ann.lee@example.com"
    assert f.request.headers["x-other"] == "[EMAIL_1]"


def test_headers_pass_rejects_non_header_names(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(UPSTREAMS + "masking:\n  headers_pass: ['a b']\n")
    with pytest.raises(ConfigError):
        load_rules(tmp_path)


def test_multipart_field_and_file_names(tmp_path: Path) -> None:
    m = addon(tmp_path)
    body = (b'--b\r\nContent-Disposition: form-data; name="ann.lee@example.com"; '
            b'filename="card 4111 1111 1111 1111.txt"\r\nContent-Type: text/plain\r\n\r\n'
            b'hello\r\n--b\r\nContent-Disposition: form-data; name="f"; '
            b"filename*=UTF-8''ssn%20536-22-4519.pdf\r\n\r\nhi\r\n--b--\r\n")
    f = mkflow("/v1/files", [("content-type", "multipart/form-data; boundary=b")], body)
    run(m, f)
    out = f.request.content.decode()
    clean(out)
    assert 'name="[EMAIL_1]"' in out and "hello" in out


def test_response_headers_masked(tmp_path: Path) -> None:
    m = addon(tmp_path)
    f = mkflow("/v1/chat/completions", [("content-type", "application/json")])
    run(m, f)
    f.response = tutils.tresp(headers=http.Headers([
        (b"content-type", b"application/json"), (b"x-debug", b"user ann.lee@example.com"),
        (b"x-card", b"4111 1111 1111 1111")]), content=b"{}")
    m.responseheaders(f)
    clean(json.dumps(list(f.response.headers.items(multi=True))))
    assert f.response.headers["content-type"] == "application/json"

"""Unit tests for the replacement of mitmproxy's own HTML error pages (egress/edge.py).

They fail loudly when mitmproxy's internals move: the pins (version, the source lines the
replacement stands in for, the factory's signature) and the HTTP/1 server actually sending
our JSON through the replaced factory."""

from __future__ import annotations

import json

import pytest
from mitmproxy import options
from mitmproxy.proxy import commands
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import _events, _http1
from mitmproxy.test import tflow, tutils

from addons.egress import edge


@pytest.fixture(autouse=True)
def installed():
    edge.install_error_pages()
    yield
    edge._BY_CONN.clear()


def test_pins_hold_for_the_installed_mitmproxy():
    assert edge.check_pins() == []


def test_a_moved_internal_refuses_to_install(monkeypatch):
    monkeypatch.setattr(edge, "_PINS", edge._PINS + (
        ((_http1.Http1Server, "send"), "a line mitmproxy never had"),))
    assert any("a line mitmproxy never had" in b for b in edge.check_pins())
    monkeypatch.setattr(_http1.make_error_response, "agentgate_errors", False)
    with pytest.raises(RuntimeError, match="cannot replace mitmproxy's error pages"):
        edge.install_error_pages()


def test_an_other_mitmproxy_version_is_refused(monkeypatch):
    monkeypatch.setattr(edge.version, "VERSION", "13.0.0")
    assert any("13.0.0" in b for b in edge.check_pins())


def test_factory_is_replaced_and_drops_mitmproxy_text():
    raw = _http1.make_error_response(413, "Request body for /secret-path exceeds")
    assert b"text/html" not in raw and b"mitmproxy" not in raw.lower()
    assert b"secret-path" not in raw
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "body_too_large"


def _server(host: str, path: str) -> _http1.Http1Server:
    ctx = Context(tflow.tclient_conn(), options.Options())
    srv = _http1.Http1Server(ctx)
    srv.request = tutils.treq(host=host, path=path.encode())
    return srv


@pytest.mark.parametrize("code,status", [(_events.ErrorCode.REQUEST_TOO_LARGE, 413),
                                         (_events.ErrorCode.CONNECT_FAILED, 502),
                                         (_events.ErrorCode.REQUEST_VALIDATION_FAILED, 400),
                                         (_events.ErrorCode.DESTINATION_UNKNOWN, 400)])
def test_http1_protocol_error_is_answered_in_the_requests_dialect(code, status):
    srv = _server("api.anthropic.com", "/v1/messages")
    cmds = list(srv.send(_events.ResponseProtocolError(1, "quoting <request>", code)))
    sent = [c for c in cmds if isinstance(c, commands.SendData)]
    assert len(sent) == 1 and isinstance(cmds[-1], commands.CloseConnection)
    head, _, body = sent[0].data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    doc = json.loads(body)
    assert doc["type"] == "error" and "<request>" not in body.decode()


def test_tunnel_dialect_wins_over_the_guess():
    srv = _server("10.0.0.1", "/x")
    edge._BY_CONN[srv.context.client.id] = "anthropic"
    cmds = list(srv.send(_events.ResponseProtocolError(
        1, "x", _events.ErrorCode.CONNECT_FAILED)))
    body = cmds[0].data.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["type"] == "error"


def test_no_connection_context_outside_a_step():
    # Between steps the current connection is reset: a page built elsewhere is generic.
    list(_server("api.anthropic.com", "/v1/messages").send(
        _events.ResponseProtocolError(1, "x", _events.ErrorCode.KILL)))
    assert edge._CURRENT.get() is None
    body = _http1.make_error_response(502).partition(b"\r\n\r\n")[2]
    assert "type" not in json.loads(body)  # generic (OpenAI-shaped), not anthropic

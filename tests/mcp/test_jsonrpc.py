"""addons/mcp/jsonrpc.py and addons/mcp/sse.py: strict JSON-RPC and SSE framing, alone."""

from __future__ import annotations

import json

import pytest

from addons.mcp import jsonrpc
from addons.mcp.jsonrpc import JsonRpcError, loads_strict, parse_message, parse_payload
from addons.mcp.sse import Event, EventTooLarge, Splitter


def req(method: str = "tools/call", id: object = 1, **params: object) -> dict:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}


def test_kinds_and_names() -> None:
    m = parse_message(req(name="send_email", arguments={"to": "x"}))
    assert (m.kind, m.id, m.method, m.tool) == ("request", 1, "tools/call", "send_email")
    assert m.names() == {"method": "tools/call", "tool": "send_email", "uri": None,
                         "prompt": None, "id": 1, "kind": "request"}
    assert parse_message({"jsonrpc": "2.0", "method": "notifications/initialized"}).kind \
        == "notification"
    assert parse_message({"jsonrpc": "2.0", "id": "a", "result": {}}).kind == "response"
    e = parse_message({"jsonrpc": "2.0", "id": None,
                       "error": {"code": -32700, "message": "x"}})
    assert e.kind == "error" and e.id is None
    assert parse_message(req("resources/read", uri="crm://x")).uri == "crm://x"
    # metadata keeps only a URI's origin: its path may hold a value
    for uri, origin in [("crm://customers/jane@example.com?x=1", "crm://customers"),
                        ("file:///home/jane/notes.txt", "file://"),
                        ("https://u:pw@h.example/p", "https://h.example"),
                        ("urn:isbn:123", "urn:")]:
        assert parse_message(req("resources/read", uri=uri)).names()["uri"] == origin
    assert parse_message(req("prompts/get", name="summarize")).prompt == "summarize"


@pytest.mark.parametrize("msg,code,id", [
    ([], jsonrpc.INVALID_REQUEST, None),
    ({"jsonrpc": "1.0", "id": 3, "method": "ping"}, jsonrpc.INVALID_REQUEST, 3),
    ({"id": 3, "method": "ping"}, jsonrpc.INVALID_REQUEST, 3),
    ({"jsonrpc": "2.0", "id": True, "method": "ping"}, jsonrpc.INVALID_REQUEST, None),
    ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, jsonrpc.INVALID_REQUEST, None),
    ({"jsonrpc": "2.0", "id": None, "method": "ping"}, jsonrpc.INVALID_REQUEST, None),
    ({"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"}, jsonrpc.INVALID_REQUEST, None),
    ({"jsonrpc": "2.0", "id": 4, "method": ""}, jsonrpc.INVALID_REQUEST, 4),
    ({"jsonrpc": "2.0", "id": 4, "method": 7}, jsonrpc.INVALID_REQUEST, 4),
    ({"jsonrpc": "2.0", "id": 4, "result": 1, "error": {}}, jsonrpc.INVALID_REQUEST, 4),
    ({"jsonrpc": "2.0", "id": 4}, jsonrpc.INVALID_REQUEST, 4),
    ({"jsonrpc": "2.0", "id": 4, "method": "ping", "tool": "x"}, jsonrpc.INVALID_REQUEST, 4),
    ({"jsonrpc": "2.0", "id": 4, "method": "ping", "params": "x"}, jsonrpc.INVALID_REQUEST, 4),
    ({"jsonrpc": "2.0", "id": 4, "error": {"code": "1", "message": "m"}},
     jsonrpc.INVALID_REQUEST, 4),
    (req(name=5), jsonrpc.INVALID_PARAMS, 1),
    (req(arguments={}), jsonrpc.INVALID_PARAMS, 1),
    (req(name="t", arguments=["a"]), jsonrpc.INVALID_PARAMS, 1),
    (req(name="t", arguments="{}"), jsonrpc.INVALID_PARAMS, 1),
    ({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": ["t"]},
     jsonrpc.INVALID_PARAMS, 2),
    (req("resources/read", uri=["crm://x"]), jsonrpc.INVALID_PARAMS, 1),
    (req("prompts/get"), jsonrpc.INVALID_PARAMS, 1),
])
def test_invalid_messages_refused_with_their_id(msg: object, code: int, id: object) -> None:
    with pytest.raises(JsonRpcError) as ei:
        parse_payload(msg)
    assert ei.value.code == code and ei.value.id == id


def test_batches() -> None:
    p = parse_payload([req(id=1, name="a"), {"jsonrpc": "2.0", "method": "notifications/x"}])
    assert p.batch and [m.kind for m in p.messages] == ["request", "notification"]
    with pytest.raises(JsonRpcError, match="batch message 1"):
        parse_payload([req(id=1, name="a"), {"jsonrpc": "2.0"}])
    with pytest.raises(JsonRpcError, match="share an id"):
        parse_payload([req(id=1, name="a"), req(id=1, name="b")])
    with pytest.raises(JsonRpcError, match="more than"):
        parse_payload([req("ping", id=i) for i in range(jsonrpc.MAX_BATCH + 1)])


@pytest.mark.parametrize("text", [
    '{"jsonrpc": "2.0", "id": 1, "method": "ping", "id": 2}',  # two readers, two ids
    '{"jsonrpc": "2.0", "id": NaN, "method": "ping"}',
    '{"jsonrpc": "2.0", "id": 1, "method": ',
    '',
])
def test_parse_errors(text: str) -> None:
    with pytest.raises(JsonRpcError) as ei:
        loads_strict(text)
    assert ei.value.code == jsonrpc.PARSE_ERROR and ei.value.id is None


def test_error_message_shape() -> None:
    got = json.loads(jsonrpc.dumps(jsonrpc.error_message(5, jsonrpc.REFUSED, "no",
                                                         {"rule": "r"})))
    assert got == {"jsonrpc": "2.0", "id": 5,
                   "error": {"code": -32001, "message": "no", "data": {"rule": "r"}}}


# ---------------------------------------------------------------- SSE framing
def _feed(chunks: list[bytes], max_event: int = 1 << 20) -> list[list[bytes]]:
    s = Splitter(max_event)
    out: list[list[bytes]] = []
    for c in chunks:
        out.extend(s.feed(c))
    out.extend(s.end())
    return out


@pytest.mark.parametrize("stream", [
    b"event: message\ndata: {\"a\":1}\n\ndata: 2\n\n",
    b"event: message\r\ndata: {\"a\":1}\r\n\r\ndata: 2\r\n\r\n",
    b"event: message\rdata: {\"a\":1}\r\rdata: 2\r\r",
    b"\xef\xbb\xbfevent: message\ndata: {\"a\":1}\n\ndata: 2",
])
def test_splitter_line_ends_and_any_cut(stream: bytes) -> None:
    want = [[b"event: message", b'data: {"a":1}'], [b"data: 2"]]
    assert _feed([stream]) == want
    for cut in range(1, len(stream)):  # every place a TCP chunk can end
        assert _feed([stream[:cut], stream[cut:]]) == want, cut
    assert _feed([bytes([b]) for b in stream]) == want


def test_splitter_bounds_one_event() -> None:
    with pytest.raises(EventTooLarge):
        _feed([b"data: " + b"x" * 2000], max_event=1024)
    with pytest.raises(EventTooLarge):
        _feed([b"data: x\n" * 300], max_event=1024)


def test_event_fields_and_render() -> None:
    ev = Event.parse([b"event: message", b"id: 7", b"data: {\"a\":", b"data:1}"])
    assert ev.name == "message" and ev.data == '{"a":\n1}'
    assert ev.render() == b'event: message\nid: 7\ndata: {"a":\ndata:1}\n\n'
    assert ev.render('{"b":2}') == b'event: message\nid: 7\ndata: {"b":2}\n\n'
    assert Event.parse([b": keep-alive"]).data is None


@pytest.mark.parametrize(("data", "want"), [
    (b'{"jsonrpc":"2.0","id":40,"method":"tools/call","params":{}}', (True, 40)),
    (b'{"params":{"id":5,"s":"\\"id\\":9"},"id":"a\\"b"}', (True, 'a"b')),
    (b'{"x":"}","id":7', (True, 7)),
    # an id only inside params, a batch, an id that is not one, none in the first bytes
    (b'{"jsonrpc":"2.0","method":"x","params":{"id":3}}', (False, None)),
    (b'[{"jsonrpc":"2.0","id":1,"method":"x"}]', (False, None)),
    (b'{"id":{"a":1}}', (False, None)),
    (b'{"id":true}', (False, None)),
    (b'{"pad":"' + b"x" * 5000 + b'","id":1}', (False, None)),
])
def test_head_id(data: bytes, want: tuple[bool, object]) -> None:
    from addons.mcp.jsonrpc import head_id
    assert head_id(data) == want

"""blobs.readable alone: which base64 payloads become text, which stay, which are refused."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from addons.mcp.blobs import INVALID_NOTE, MAX_DEPTH, TooDeep, readable


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_text_blob_becomes_text_and_the_input_is_not_modified() -> None:
    item = {"uri": "mem://a", "mimeType": "application/octet-stream",
            "blob": b64(b"ann@example.com\n")}
    obj = {"result": {"contents": [item]}}
    new, changed = readable(obj)
    assert changed and new["result"]["contents"][0] == {
        "uri": "mem://a", "mimeType": "application/octet-stream", "text": "ann@example.com\n"}
    assert "blob" in item  # the original stays as it was


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n\x00\x01", "a".encode("utf-16-le"),
                                  b"\xff\xfe\x00"])
def test_binary_payloads_stay(data: bytes) -> None:
    obj = {"contents": [{"uri": "mem://b", "blob": b64(data)}],
           "content": [{"type": "image", "mimeType": "image/png", "data": b64(data)}]}
    new, changed = readable(obj)
    assert not changed and new is obj


def test_media_that_is_text_becomes_a_text_item() -> None:
    new, changed = readable({"content": [{"type": "audio", "mimeType": "audio/wav",
                                          "data": b64(b"call 555-0100"),
                                          "annotations": {"priority": 1}}]})
    assert changed and new == {"content": [{"type": "text", "text": "call 555-0100",
                                            "annotations": {"priority": 1}}]}


@pytest.mark.parametrize("bad", ["!!!", "YWJj*ZGVm", 42, None])
def test_invalid_base64_is_replaced_by_a_note(bad: Any) -> None:
    new, changed = readable({"uri": "mem://c", "blob": bad})
    assert changed and new == {"uri": "mem://c", "text": INVALID_NOTE}


def test_too_deep_is_refused() -> None:
    obj: Any = {"blob": b64(b"x")}
    for _ in range(MAX_DEPTH + 2):
        obj = [obj]
    with pytest.raises(TooDeep):
        readable(obj)


@pytest.mark.parametrize(("text", "maybe"), [
    ('{"result":{"rows":[{"a":1}]}}', False),
    ('{"result":{"contents":[{"blob":"eA=="}]}}', True),
    ('{"result":{"content":[{"type":"image","data":"eA=="}]}}', True),
    ('{"result":{"contents":[{"\\u0062lob":"eA=="}]}}', True),   # a key spelled with escapes
])
def test_only_texts_that_may_hold_payloads_are_walked(text: str, maybe: bool) -> None:
    from addons.mcp.jsonrpc import may_hold_payloads
    assert may_hold_payloads(text) is maybe

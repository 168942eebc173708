"""Hostile: a resource contents item with both `text` and `blob` (the MCP schema allows
one of them; a client may read either). The walk skipped the blob of such an item, so a
client that reads `blob` first got the base64 of PII past masking. Now a blob of text (or
of invalid base64) beside a text is dropped: what is left is the text, which masking reads.
A binary blob stays as it is (masking does not read into binary payloads, as before)."""

from __future__ import annotations

import base64

from addons.mcp.blobs import readable


def test_blob_beside_text_never_passes_unread() -> None:
    pii = base64.b64encode(b"SSN 078-05-1120, ann@example.com").decode()
    item = {"uri": "file:///a", "mimeType": "text/plain", "text": "nothing here",
            "blob": pii}
    out, changed = readable({"contents": [item]})
    assert changed
    assert out == {"contents": [{"uri": "file:///a", "mimeType": "text/plain",
                                 "text": "nothing here"}]}
    assert item["blob"] == pii  # the input is not modified
    # invalid base64 beside a text: dropped too (a lenient client would decode it)
    out, _ = readable({"text": "t", "blob": "U1NO-IDA3OC0wNS0xMTIw"})
    assert out == {"text": "t"}
    # a binary blob beside a text stays (binary payloads are not read, as without text)
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00").decode()
    out, changed = readable({"text": "t", "blob": png})
    assert not changed and out == {"text": "t", "blob": png}

"""masking.addon.set_plain_body is exactly what it replaces, mitmproxy's own
`headers.pop("content-encoding", None); message.content = data`, on header sets of any
mix of Content-Encoding, Content-Length and Transfer-Encoding fields (repeated, any case,
empty values), requests and responses: the same fields in the same order and the same
raw body."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tutils

from addons.masking.addon import set_plain_body

NAMES = [b"Content-Encoding", b"content-encoding", b"CONTENT-LENGTH", b"Content-Length",
         b"transfer-encoding", b"Transfer-Encoding", b"x-other", b"Content-Type", b"host"]
VALUES = [b"", b"gzip", b"identity", b"12", b"chunked", b"x, y", b"br"]

fields = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=8)


def _msg(kind: str, fs: list[tuple[bytes, bytes]]) -> http.Message:
    m = tutils.treq() if kind == "req" else tutils.tresp()
    m.headers = http.Headers(list(fs))
    m.raw_content = b"old body"
    return m


@settings(max_examples=500, derandomize=True, deadline=None)
@given(fields, st.binary(max_size=64), st.sampled_from(["req", "resp"]))
def test_set_plain_body_is_pop_then_set_content(fs, data, kind):
    a, b = _msg(kind, fs), _msg(kind, fs)
    a.headers.pop("content-encoding", None)
    a.content = data
    set_plain_body(b, data)
    assert b.headers.fields == a.headers.fields
    assert b.raw_content == a.raw_content == data

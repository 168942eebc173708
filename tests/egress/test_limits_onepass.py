"""EdgeLimits.requestheaders reads the header count, size and Content-Length values in one
pass over the fields (addons/egress/limits.py): the very refusals (status, code, message)
that mitmproxy's len(headers), the fields' sizes and get_all("content-length") give,
checked in the same order (differential, property-based)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow

from addons.egress.limits import EdgeLimits

NAMES = st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Host",
                         b"host", b"X-A", b"x-a", b"Accept", b"Content-Lengthx"])
VALUES = st.sampled_from([b"0", b"12", b" 12 ", b"012", b"-1", b"99999999", b"1x", b"",
                          "\u0661\u0662".encode(), b"\xff", b"12, 12", b"7"])
FIELDS = st.lists(st.tuples(NAMES, VALUES), max_size=9)


def reference(flow: http.HTTPFlow, limits: tuple[int, int, int]) -> tuple | None:
    """The checks as they were written with mitmproxy's own header accessors."""
    max_headers, max_header_bytes, max_body_bytes = limits
    headers = flow.request.headers
    if len(headers) > max_headers:
        return 431, "headers_too_large", f"more than {max_headers} request headers"
    size = sum(len(k) + len(v) + 4 for k, v in headers.fields)
    if size > max_header_bytes:
        return 431, "headers_too_large", f"request headers larger than {max_header_bytes} bytes"
    lengths = headers.get_all("content-length")
    if lengths:
        try:
            declared = {int(v.strip()) for v in lengths}
        except ValueError:
            return 400, "bad_content_length", "malformed Content-Length"
        if len(declared) > 1 or min(declared) < 0:
            return 400, "bad_content_length", "conflicting Content-Length headers"
        if declared.pop() > max_body_bytes:
            return 413, "body_too_large", f"request body larger than {max_body_bytes} bytes"
    return None


@settings(max_examples=500, deadline=None)
@given(fields=FIELDS, max_headers=st.integers(1, 6), max_header_bytes=st.integers(20, 200),
       max_body=st.integers(0, 100))
def test_same_refusals_as_mitmproxys_accessors(fields, max_headers, max_header_bytes,
                                               max_body) -> None:
    lim = EdgeLimits()
    lim._limits = (max_headers, max_header_bytes, max_body)
    f = tflow.tflow()
    f.request.headers = http.Headers(fields)
    want = reference(f, lim._limits)
    lim.requestheaders(f)
    got = None if f.response is None else (
        f.response.status_code, f.metadata["refusal"]["code"], f.metadata["refusal"]["message"])
    assert got == want, fields

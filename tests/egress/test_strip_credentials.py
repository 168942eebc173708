"""strip_credentials (one pass over the fields) removes exactly what the per-name lookup it
replaced removed, in the same order, for any header set (differential, property-based)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from addons.egress.credentials import CREDENTIAL_HEADERS, strip_credentials


def reference(headers: http.Headers, extra: str | None) -> list[str]:
    """The previous implementation: mitmproxy's own case-insensitive lookup per name."""
    removed = []
    for name in (*CREDENTIAL_HEADERS, *((extra,) if extra else ())):
        if name in headers:
            del headers[name]
            removed.append(name)
    return removed


def cased(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda ups: "".join(c.upper() if u else c for c, u in zip(name, ups, strict=True)))


NAMES = st.one_of(st.sampled_from(CREDENTIAL_HEADERS).flatmap(cased),
                  st.sampled_from(["host", "content-type", "x-agent-session", "X-Custom-Key",
                                   "authorization-x", "x-api-key2"]))
FIELDS = st.lists(st.tuples(NAMES, st.text(alphabet="ab=1 ", max_size=5)), max_size=12)
EXTRA = st.one_of(st.none(), st.sampled_from(["Authorization", "x-api-key", "X-Custom-Key",
                                              "api-key", "X-Goog-Api-Key"]))


@settings(max_examples=300, deadline=None)
@given(fields=FIELDS, extra=EXTRA)
def test_same_result_as_the_per_name_lookup(fields: list[tuple[str, str]],
                                            extra: str | None) -> None:
    raw = tuple((k.encode(), v.encode()) for k, v in fields)
    a, b = http.Headers(raw), http.Headers(raw)
    assert strip_credentials(a, extra) == reference(b, extra)
    assert a.fields == b.fields


def test_extra_naming_a_builtin_in_another_case() -> None:
    """The upstream's own header is also a built-in one: removed once, no KeyError."""
    h = http.Headers([(b"Authorization", b"Bearer t"), (b"host", b"x")])
    assert strip_credentials(h, "Authorization") == ["authorization"]
    assert h.fields == ((b"host", b"x"),)

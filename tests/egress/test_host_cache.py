"""upstreams.parse_host (remembered) answers exactly as mitmproxy's strict parse_authority."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.net.http import url

from addons.egress.upstreams import _authority, parse_host


def reference(value: str):
    try:
        return url.parse_authority(value, check=True)
    except ValueError:
        return None


HOSTS = st.one_of(
    st.sampled_from(["api.openai.com", "API.OpenAI.com.", "[::1]", "127.0.0.1", "xn--zz",
                     "a..b", "bad host", "exämple.com", "", ":443", "h:0", "h:65536"]),
    st.text(alphabet="abc.-:[]1é% ", max_size=20))
PORTS = st.one_of(st.just(""), st.integers(-1, 70000).map(lambda p: f":{p}"))


@settings(max_examples=300, deadline=None)
@given(host=HOSTS, port=PORTS)
def test_same_answer_as_parse_authority(host: str, port: str) -> None:
    value = host + port
    assert parse_host(value) == reference(value)
    assert parse_host(value) == reference(value)  # and again, from the cache


def test_long_values_are_not_kept() -> None:
    before = _authority.cache_info().currsize
    value = "a" * 290 + ".example.com"
    assert parse_host(value) == reference(value)
    assert _authority.cache_info().currsize == before

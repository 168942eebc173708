"""Hostile: the incremental JSON parse (addons/frame/decode.py parse_memo) through a real
mitmdump. A session's second body starts with exactly the text the first one's memo kept
(up to the end of the message list's last item) and goes on with something a careful
reader must notice: a duplicate top-level key after the list (plain or `\\u`-escaped),
digits that extend the last item (a number `4111` becoming a card), a lone surrogate,
deep nesting within the bounds, trailing garbage, a second value after the object.

Differential: each second body is also sent alone in a fresh session (no memo: a full
parse); the answer's status and what the upstream receives must be the same, byte for
byte, and no card reaches the upstream."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com/ev"
OPENAI = "https://api.openai.com/v1/chat/completions"
CARD = "4111111111111111"
FILLER = "lorem ipsum dolor sit amet " * 400  # past MEMO_MIN_CHARS


def first(last_item: str) -> str:
    """A body whose memo ends right after `last_item` (raw JSON text)."""
    return ('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + FILLER
            + '"},' + last_item)


def variants() -> list[tuple[str, str, str]]:
    """(name, first body, second body): the second starts with the first's memo text."""
    msg = '{"role":"user","content":"hi"}'
    out = []
    b = first(msg)
    out += [
        ("duplicate key after the list", b + "]}", b + '],"model":"gpt-4o"}'),
        ("escaped duplicate key", b + "]}", b + '],"mod\\u0065l":"gpt-4o"}'),
        ("duplicate of the list key", b + "]}", b + '],"messages":[]}'),
        ("trailing garbage", b + "]}", b + "]}x"),
        ("second value", b + "]}", b + "]} {}"),
        ("unclosed", b + "]}", b + ',' + msg),
        ("lone surrogate", b + "]}", b + ',{"role":"user","content":"a\\ud800b"}]}'),
        ("deep within bounds", b + "]}", b + "," + "[" * 200 + '"' + CARD + '"' + "]" * 200
         + "]}"),
        ("new card", b + "]}", b + ',{"role":"user","content":"card ' + CARD + '"}]}'),
    ]
    n = first("4111")
    out += [("number extended into a card", n + "]}", n + "111111111111]}"),
            ("number extended by a fraction", n + "]}", n + ".111111111111e12]}")]
    return out


@pytest.fixture(scope="module")
def cases() -> list[tuple[str, str, str]]:
    return variants()


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity)


def send(c: httpx.Client, url: str, session: str, body: str) -> httpx.Response:
    return c.post(url, content=body.encode("utf-8", "surrogatepass"),
                  headers={"content-type": "application/json", "x-agent-session": session,
                           "authorization": "Bearer sk-agent"})


@pytest.mark.parametrize("url", [HOOK, OPENAI], ids=["webhook", "openai"])
def test_a_continued_body_reads_as_a_full_parse(gw, standin, cases, url) -> None:
    bad = []
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for i, (name, one, two) in enumerate(cases):
            assert two.startswith(one[:-2]) and len(two) > 8192, name
            standin.clear()
            r1 = send(c, url, f"memo-{i}", one)
            assert r1.status_code == 200, (name, r1.text[:300])
            standin.clear()
            got = send(c, url, f"memo-{i}", two)
            up_memo = [r["body"] for r in standin.requests]
            standin.clear()
            want = send(c, url, f"fresh-{i}", two)
            up_full = [r["body"] for r in standin.requests]
            if (got.status_code, up_memo) != (want.status_code, up_full):
                bad.append((name, got.status_code, want.status_code,
                            [b[-120:] for b in up_memo], [b[-120:] for b in up_full]))
            for b in up_memo:
                digits = "".join(ch for ch in b if ch.isdigit())
                if CARD in b or CARD in digits.replace("0", ""):
                    bad.append((name, "card upstream", b[-200:]))
        standin.clear()
        assert send(c, HOOK, "after", '{"hello":"world"}').status_code == 200
    assert bad == [], bad


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate"])
def test_a_compressed_turn_continues_the_memo_and_is_masked(gw, standin, coding) -> None:
    """The memo works on the decoded text: a turn sent compressed continues the session's
    parse like a plain one, and the card it adds is masked all the same; a compressed turn
    that decodes past the cap is refused, nothing upstream."""
    import gzip
    import zlib

    import brotli
    squeeze = {"gzip": gzip.compress, "br": brotli.compress, "deflate": zlib.compress}[coding]
    b = first('{"role":"user","content":"hi"}')
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        assert send(c, OPENAI, "z", b + "]}").status_code == 200
        two = b + ',{"role":"user","content":"card ' + CARD + '"}]}'
        standin.clear()
        r = c.post(OPENAI, content=squeeze(two.encode()), headers={
            "content-type": "application/json", "content-encoding": coding,
            "x-agent-session": "z", "authorization": "Bearer sk-agent"})
        assert r.status_code == 200, r.text[:300]
        up = standin.requests[0]["body"]
        assert CARD not in up and "[CREDIT_CARD_1]" in up
        bomb = b + ',{"role":"user","content":"' + "a" * (64 << 20) + '"}]}'
        standin.clear()
        r = c.post(OPENAI, content=squeeze(bomb.encode()), headers={
            "content-type": "application/json", "content-encoding": coding,
            "x-agent-session": "z", "authorization": "Bearer sk-agent"})
        assert r.status_code in (400, 413), r.text[:300]
        assert standin.requests == []
        assert send(c, OPENAI, "z", b + "]}").status_code == 200

"""Issue 11, class 5 and the bomb part of 9: every step reads the body through one strict,
bounded decoder. A BOM, UTF-16/32, a compression or a duplicate key cannot make policy see
something else than masking and the upstream; a gzip bomb is never inflated beyond the cap.
Through a real mitmdump; each case asserts the stand-in upstream received nothing."""

from __future__ import annotations

import codecs
import gzip
import json
import zlib

import brotli
import pytest
import zstandard

from tests.hostile.policykit import (
    OPENAI,
    RSS_PEAK_LIMIT_KB,
    assert_passes,
    assert_refused,
    chat,
    peak_rss_kb,
)

pytestmark = pytest.mark.integration

RULES = """
policies:
  - name: no-gpt5
    match: {model: ["gpt-5*"]}
    action: block
  - name: no-bluebird
    match: {prompt: {words: [project bluebird]}}
    action: block
"""
URL = OPENAI + "/v1/chat/completions"


@pytest.fixture
def gw(gateway_factory, no_identity):
    return gateway_factory("{standin_upstreams}" + no_identity + RULES)


def _encodings(doc: dict) -> list[tuple[str, bytes]]:
    text = json.dumps(doc, ensure_ascii=False)
    return [
        ("utf-8 BOM", codecs.BOM_UTF8 + text.encode()),
        ("utf-16-le BOM", codecs.BOM_UTF16_LE + text.encode("utf-16-le")),
        ("utf-16-be BOM", codecs.BOM_UTF16_BE + text.encode("utf-16-be")),
        ("utf-16-le", text.encode("utf-16-le")),
        ("utf-16-be", text.encode("utf-16-be")),
        ("utf-32-le", text.encode("utf-32-le")),
        ("utf-32-be BOM", codecs.BOM_UTF32_BE + text.encode("utf-32-be")),
        ("leading whitespace + BOM", codecs.BOM_UTF8 + b" \n" + text.encode()),
    ]


def test_charsets_and_boms_cannot_hide_a_blocked_model_or_keyword(gw, standin) -> None:
    for name, body in _encodings(chat("gpt-5-pro")):
        assert_refused(gw, standin, URL, body, rule="no-gpt5", what=name)
    for name, body in _encodings(chat(text="tell me about Project Bluebird")):
        assert_refused(gw, standin, URL, body, rule="no-bluebird", what=name)
    # and with a charset parameter that lies (JSON is read as RFC 8259 says, like masking)
    body = codecs.BOM_UTF16_LE + json.dumps(chat("gpt-5")).encode("utf-16-le")
    assert_refused(gw, standin, URL, body, rule="no-gpt5",
                   content_type="application/json; charset=utf-8", what="lying charset")
    assert_passes(gw, standin, URL, chat())


@pytest.mark.parametrize("enc,pack", [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress),
    ("zstd", lambda b: zstandard.ZstdCompressor().compress(b)),
    ("gzip, br", lambda b: brotli.compress(gzip.compress(b))),
])
def test_compressed_bodies_are_judged(gw, standin, enc: str, pack) -> None:
    inner = codecs.BOM_UTF8 + json.dumps(chat("gpt-5")).encode()
    assert_refused(gw, standin, URL, pack(inner), rule="no-gpt5", content_encoding=enc,
                   what=enc)


def test_duplicate_keys_are_refused(gw, standin) -> None:
    body = b'{"model": "gpt-5", "model": "gpt-4o-mini", "messages": []}'
    assert_refused(gw, standin, URL, body, status=400, what="duplicate model")


def test_unknown_content_encoding_is_refused(gw, standin) -> None:
    assert_refused(gw, standin, URL, json.dumps(chat()).encode(), status=(400, 415),
                   content_encoding="compress", what="compress")


def _bomb(mib: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1 << 20)
    out = [c.compress(b'{"model": "gpt-4o-mini", "pad": "')]
    out += [c.compress(block) for _ in range(mib)]
    out.append(c.compress(b'"}') + c.flush())
    return b"".join(out)


def test_gzip_bomb_is_refused_with_bounded_memory(gw, standin) -> None:
    bomb = _bomb(1536)  # ~1.5 MB on the wire, 1.5 GiB inflated
    assert len(bomb) < 2 * 1024 * 1024
    assert_refused(gw, standin, URL, bomb, status=(400, 413), content_encoding="gzip",
                   what="gzip bomb")
    assert peak_rss_kb(gw) < RSS_PEAK_LIMIT_KB, peak_rss_kb(gw)
    assert_passes(gw, standin, URL, chat())  # still serving everyone else

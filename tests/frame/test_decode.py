"""The one body decoder (addons/frame/decode.py): one plain test per case."""

from __future__ import annotations

import codecs
import gzip
import json
import zlib

import brotli
import pytest
import zstandard

from addons.frame import decode
from addons.frame.decode import Body, DecodeError, TooLarge, decode_body, decompress

DOC = {"model": "gpt-4o", "messages": [{"role": "user", "content": "héllo ✓"}]}
TEXT = json.dumps(DOC, ensure_ascii=False)


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("enc,pack", [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", _raw_deflate),
    ("br", brotli.compress),
    ("zstd", lambda b: zstandard.ZstdCompressor().compress(b)),
    ("identity", lambda b: b),
    ("", lambda b: b),
])
def test_each_coding(enc: str, pack) -> None:
    raw = TEXT.encode()
    assert decompress(pack(raw), enc) == raw


def test_coding_chain_is_undone_right_to_left() -> None:
    raw = TEXT.encode()
    packed = brotli.compress(gzip.compress(raw))
    assert decompress(packed, "gzip, br") == raw


def test_gzip_members_are_all_read() -> None:
    assert decompress(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip") == b"abcd"


def test_unknown_coding_refused() -> None:
    with pytest.raises(DecodeError) as ei:
        decompress(b"x", "compress")
    assert ei.value.status == 415


def test_too_many_codings_refused() -> None:
    with pytest.raises(DecodeError):
        decompress(b"x", "gzip, gzip, gzip, gzip, gzip")


@pytest.mark.parametrize("enc,pack", [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress),
    ("zstd", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_bomb_stops_at_the_absolute_cap(enc: str, pack) -> None:
    bomb = pack(b"\0" * (8 * 1024 * 1024))
    with pytest.raises(TooLarge):
        decompress(bomb, enc, max_bytes=2 * 1024 * 1024, max_ratio=10**9)


def test_bomb_stops_at_the_ratio() -> None:
    bomb = gzip.compress(b"\0" * (4 * 1024 * 1024))  # ~4 KiB on the wire, ratio ~1000
    with pytest.raises(TooLarge):
        decompress(bomb, "gzip", max_bytes=64 * 1024 * 1024, max_ratio=100)
    # below the ratio floor, a small repetitive body is fine
    assert len(decompress(gzip.compress(b"a" * 500_000), "gzip")) == 500_000


def test_corrupt_and_truncated_are_errors() -> None:
    packed = gzip.compress(TEXT.encode())
    with pytest.raises(DecodeError):
        decompress(packed[: len(packed) // 2], "gzip")
    with pytest.raises(DecodeError):
        decompress(b"not gzip at all", "gzip")
    with pytest.raises(DecodeError):
        decompress(b"not brotli", "br")


@pytest.mark.parametrize("codec,bom", [
    ("utf-8", codecs.BOM_UTF8),
    ("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
    ("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE),
])
def test_json_with_bom(codec: str, bom: bytes) -> None:
    body = Body(bom + TEXT.encode(codec), "application/json", {})
    assert body.json == DOC
    assert body.text == TEXT


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_json_without_bom_rfc4627(codec: str) -> None:
    body = Body(TEXT.encode(codec), "application/json", {})
    assert body.json == DOC


def test_json_charset_parameter_is_ignored_for_json() -> None:
    # RFC 8259: JSON is UTF-8; a wrong charset parameter must not change what we read
    body = Body(TEXT.encode(), "application/json", {"charset": "latin-1"})
    assert body.json == DOC


def test_text_charset_parameter() -> None:
    body = Body("grüße".encode("latin-1"), "text/plain", {"charset": "iso-8859-1"})
    assert body.text == "grüße"


def test_unknown_charset_refused() -> None:
    with pytest.raises(DecodeError):
        _ = Body(b"abc", "text/plain", {"charset": "x-no-such"}).text


def test_invalid_utf8_is_an_error_not_replaced() -> None:
    with pytest.raises(DecodeError):
        _ = Body(b"{\"a\": \"\xff\"}", "application/json", {}).json


def test_bom_json_without_content_type() -> None:
    assert Body(codecs.BOM_UTF8 + TEXT.encode()).json == DOC


def test_duplicate_keys_refused() -> None:
    with pytest.raises(DecodeError) as ei:
        _ = Body(b'{"model": "a", "model": "b"}', "application/json", {}).json
    assert "duplicate" in ei.value.reason


def test_declared_json_that_does_not_parse_is_an_error() -> None:
    with pytest.raises(DecodeError):
        _ = Body(b"{nope", "application/json", {}).json
    assert Body(b"{nope", "text/plain", {}).json is None
    assert Body(b"hello", "", {}).json is None
    assert Body(b"a=1", "application/x-www-form-urlencoded", {}).json is None


def test_decode_body_combines_both() -> None:
    raw = gzip.compress(codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le"))
    body = decode_body(raw, "gzip", "application/json; charset=utf-8")
    assert body.json == DOC


class _Headers(dict):
    def get(self, k, d=None):  # noqa: ANN001
        return super().get(k.lower(), d)


class _Msg:
    def __init__(self, raw: bytes | None, **headers: str) -> None:
        self.raw_content = raw
        self.headers = _Headers({k.replace("_", "-"): v for k, v in headers.items()})


class _Flow:
    def __init__(self, req: _Msg) -> None:
        self.request = req
        self.response = None


def test_flow_cache_decodes_once_and_follows_rewrites(monkeypatch) -> None:
    calls = []
    real = decode.decompress

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(decode, "decompress", counting)
    f = _Flow(_Msg(gzip.compress(TEXT.encode()), content_encoding="gzip",
                   content_type="application/json"))
    b1 = decode.request_body(f)
    assert decode.request_body(f) is b1 and len(calls) == 1
    assert b1.json is b1.json
    f.request.raw_content = b'{"model": "x"}'
    f.request.headers = _Headers({"content-type": "application/json"})
    assert decode.request_body(f).json == {"model": "x"} and len(calls) == 2


def test_flow_streamed_body_is_an_error() -> None:
    with pytest.raises(DecodeError):
        decode.request_body(_Flow(_Msg(None)))


def test_flow_errors_are_cached_too() -> None:
    f = _Flow(_Msg(b"garbage", content_encoding="gzip"))
    for _ in range(2):
        with pytest.raises(DecodeError):
            decode.request_body(f)


@pytest.mark.parametrize("fields", [
    [],
    [(b"Content-Type", b"application/json")],
    [(b"content-encoding", b"gzip"), (b"CONTENT-TYPE", b"text/plain; charset=latin-1")],
    [(b"Content-Encoding", b"gzip"), (b"x-a", b"1"), (b"content-encoding", b"br")],
    [(b"content-type", b"a/b; x=\xe9\xff"), (b"content-type", b"c/d")],
    [(b"content-typ", b"x"), (b"content-typee", b"y"), (b"xontent-encoding", b"z")],
])
def test_coding_and_type_read_as_headers_get_does(fields) -> None:
    from mitmproxy import http
    h = http.Headers(fields)
    assert decode.coding_and_type(h) == (h.get("content-encoding", ""),
                                         h.get("content-type", ""))


def test_coding_and_type_is_read_once_per_fields_tuple() -> None:
    """Asked again of the same headers (policy, sessions, masking, the shared decode: ~8
    times a flow), the answer kept with the very `fields` tuple is given without a pass
    over the fields; any change of the headers (a new tuple) is read again."""
    from mitmproxy import http

    passes: list[int] = []

    class Counted(tuple):
        def __iter__(self):  # noqa: ANN204 - one pass over the fields
            passes.append(1)
            return super().__iter__()

    h = http.Headers([(b"Content-Type", b"application/json")])
    h.fields = Counted(h.fields)
    for _ in range(3):
        assert decode.coding_and_type(h) == ("", "application/json")
    assert len(passes) == 1
    h["content-encoding"] = "gzip"  # mitmproxy assigns a new fields tuple
    h.fields = Counted(h.fields)
    passes.clear()  # (the assignment above walked the old fields itself)
    assert decode.coding_and_type(h) == ("gzip", "application/json")
    assert decode.coding_and_type(h) == ("gzip", "application/json")
    assert len(passes) == 1
    h.fields = ((b"content-type", b"text/plain"),)  # replaced whole, as masking does
    assert decode.coding_and_type(h) == ("", "text/plain")

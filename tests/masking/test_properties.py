"""Property: whatever the encoding, compression, framing, chunking or split, no PII value
survives decoding + masking + SSE reassembly (issue 11, class 7).

Hypothesis generates a body carrying one value (card, SSN, e-mail, IBAN, API key) written in
any supported way (JSON escapes, URL/form encoding, multipart, UTF-16 with a BOM, Unicode
digits, zero-width characters), framed as JSON / NDJSON / SSE (any line endings, split
across events, lines, sibling fields and network chunks), compressed with gzip / br / zstd /
deflate; the masked output must not contain the value, read raw, JSON-decoded or
URL-decoded. Derandomised and bounded (CI stays well under 30 s).
"""

from __future__ import annotations

import gzip
import json
import unicodedata
import zlib
from urllib.parse import quote, quote_plus, unquote_plus

import brotli
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking.addon import mask_message
from addons.masking.bodies import Masked
from addons.masking.detectors import SAMPLES, DetectorSet
from addons.masking.masker import Masker, Session
from addons.masking.sse import StreamDecoder, StreamMasker

DS = DetectorSet()
LIMIT = 1 << 22
PROFILE = settings(max_examples=400, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALUES = {
    "CREDIT_CARD": ["4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111",
                    "5500,0000,0000,0004", "4111_1111/1111.1111", "4111\n1111\n1111\n1111"],
    "US_SSN": ["536-22-4519", "536 22 4519", "536_22/4519", "536.22-4519"],
    "EMAIL": ["ann.lee@example.com", "j.doe+x@mail.example.org"],
    "IBAN": ["GB82WEST12345698765432", "DE89 3704 0044 0532 0130 00",
             "DE89/3704/0044/0532/0130/00"],
    "OPENAI_KEY": [SAMPLES["OPENAI_KEY"]],
    "GITHUB_TOKEN": [SAMPLES["GITHUB_TOKEN"]],
}
ZW = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"]
FULLWIDTH = {str(d): chr(0xFF10 + d) for d in range(10)}
ARABIC = {str(d): chr(0x0660 + d) for d in range(10)}
PROSE = ["Hello, please use ", "Details follow: ", "", "ok "]
TAIL = [" thanks.", "", " and that is all", "."]


def canon(text: str) -> str:
    """The text as the detectors read it: invisible characters gone, digits ASCII."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cf", "Mn") or ch in ZW:
            continue
        d = unicodedata.digit(ch, None) if not ch.isascii() else None
        out.append(str(d) if d is not None else ch)
    return unicodedata.normalize("NFKC", "".join(out))


@st.composite
def disguised(draw) -> tuple[str, str]:
    """(entity, the value as written)."""
    entity = draw(st.sampled_from(sorted(VALUES)))
    value = draw(st.sampled_from(VALUES[entity]))
    how = draw(st.sampled_from(["plain", "zw", "fullwidth", "arabic"]))
    if how == "zw":
        k = draw(st.integers(1, 3))
        for _ in range(k):
            i = draw(st.integers(1, len(value) - 1))
            value = value[:i] + draw(st.sampled_from(ZW)) + value[i:]
    elif how in ("fullwidth", "arabic") and entity in ("CREDIT_CARD", "US_SSN"):
        table = FULLWIDTH if how == "fullwidth" else ARABIC
        value = "".join(table.get(c, c) for c in value)
    return entity, value


def splits(draw, text: str, lo: int = 1, hi: int = 6) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)),
                                    min_size=lo - 1, max_size=hi))))
    out, prev = [], 0
    for c in cuts:
        out.append(text[prev:c])
        prev = c
    out.append(text[prev:])
    return [p for p in out if p]


def compress(data: bytes, enc: str) -> bytes:
    if enc == "gzip":
        return gzip.compress(data)
    if enc == "deflate":
        return zlib.compress(data)
    if enc == "br":
        return brotli.compress(data)
    if enc == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def views(out: bytes) -> list[str]:
    """The output read raw, as text in its charset, JSON-decoded and URL-decoded."""
    texts = [out.decode("latin-1")]
    for cs in ("utf-8", "utf-16"):
        try:
            texts.append(out.decode(cs))
        except UnicodeDecodeError:
            pass
    more = []
    for t in texts:
        more.append(unquote_plus(t))
        for line in t.replace("\r", "\n").split("\n"):
            line = line[5:].strip() if line.startswith("data:") else line
            try:
                more.append(json.dumps(json.loads(line), ensure_ascii=False))
            except ValueError:
                pass
        try:
            more.append(json.dumps(json.loads(t), ensure_ascii=False))
        except ValueError:
            pass
    return texts + more


def assert_masked(out: bytes, value: str) -> None:
    needle = canon(value)
    for v in views(out):
        assert value not in v, (value, v[:400])
        assert needle not in canon(v), (value, v[:400])
        assert needle not in canon(json.dumps(v)[1:-1].replace("\\n", "\n")), value


def ctx(dialect: str = "openai") -> Masked:
    return Masked(Masker(DS, b"k"), Session(), {}, dialect=dialect)


# ---------------------------------------------------------------- request bodies
@st.composite
def request_bodies(draw) -> tuple[bytes, str, str]:
    """(body, content type, the value as written)."""
    _, value = draw(disguised())
    text = draw(st.sampled_from(PROSE)) + value + draw(st.sampled_from(TAIL))
    framing = draw(st.sampled_from(["json", "json_escaped", "json_parts", "json_items",
                                    "json_key", "form", "multipart", "multipart_name",
                                    "ndjson", "utf16"]))
    if framing == "json":
        key = draw(st.sampled_from(["content", "format", "id", "type", "status", "x"]))
        body = json.dumps({"model": "m", "messages": [{"role": "user", key: text}]}).encode()
        return body, "application/json", value
    if framing == "json_escaped":
        esc = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c for c in text)
        return ('{"model":"m","messages":[{"role":"user","content":"' + esc + '"}]}').encode(), \
            "application/json", value
    if framing == "json_parts":
        parts = [{"type": "text", "text": p} for p in splits(draw, text)]
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]})
        return body.encode(), "application/json", value
    if framing == "json_items":
        return json.dumps({"input": splits(draw, text)}).encode(), "application/json", value
    if framing == "json_key":
        return json.dumps({"metadata": {text: 1}}).encode(), "application/json", value
    if framing == "form":
        body = "a=1&q=" + draw(st.sampled_from([quote_plus(text), quote(text, safe="")]))
        return body.encode(), "application/x-www-form-urlencoded", value
    if framing in ("multipart", "multipart_name"):
        if framing == "multipart":
            head, content = 'name="note"', text
        else:
            head, content = f'name="f"; filename="{text}.txt"', "hello"
        body = (f"--xb\r\nContent-Disposition: form-data; {head}\r\n"
                f"Content-Type: text/plain\r\n\r\n{content}\r\n--xb--\r\n").encode()
        return body, "multipart/form-data; boundary=xb", value
    if framing == "ndjson":
        lines = [json.dumps({"model": "m", "message": {"content": p}})
                 for p in splits(draw, text)]
        return "\n".join(lines).encode(), "application/x-ndjson", value
    body = json.dumps({"messages": [{"role": "user", "content": text}]}, ensure_ascii=False)
    return b"\xff\xfe" + body.encode("utf-16-le"), "application/json", value


@PROFILE
@given(request_bodies(), st.sampled_from(["", "gzip", "deflate", "br", "zstd", "gzip, br"]),
       st.sampled_from(["openai", "anthropic", "generic"]))
def test_request_body_never_carries_the_value(body_ct, enc, dialect) -> None:
    body, ctype, value = body_ct
    raw = body
    for e in [c.strip() for c in enc.split(",") if c.strip()]:
        raw = compress(raw, e)
    out = mask_message(ctx(dialect), raw, enc, ctype, LIMIT, False)
    assert out is not None, "nothing was masked"
    assert_masked(out, value)


# ---------------------------------------------------------------- SSE responses
@st.composite
def sse_streams(draw) -> tuple[bytes, str]:
    _, value = draw(disguised())
    text = draw(st.sampled_from(PROSE)) + value + draw(st.sampled_from(TAIL))
    shape = draw(st.sampled_from(["chat", "anthropic", "plain", "ollama", "legacy"]))
    eols = draw(st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=3))
    events = []
    for p in splits(draw, text, 1, 8):
        if shape == "chat":
            data = json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]})
        elif shape == "anthropic":
            data = json.dumps({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": p}})
        elif shape == "ollama":
            data = json.dumps({"model": "llama3", "message": {"content": p}, "done": False})
        elif shape == "legacy":
            data = json.dumps({"choices": [{"index": 0, "text": p}]})
        else:
            data = p.replace("\r", " ").replace("\n", " ")
        events.append(data)
    out = ""
    if draw(st.booleans()):
        out += "\ufeff"
    for i, data in enumerate(events):
        e1, e2 = eols[i % len(eols)], eols[(i + 1) % len(eols)]
        if draw(st.booleans()):
            out += ": keep-alive" + e1
        out += f"data: {data}{e1}{e2}"
    if shape == "chat":
        out += "data: [DONE]\n\n"
    return out.encode(), value


@PROFILE
@given(sse_streams(), st.sampled_from(["", "gzip", "deflate", "br", "zstd"]),
       st.lists(st.integers(1, 64), min_size=1, max_size=8), st.booleans())
def test_sse_stream_never_carries_the_value(stream_value, enc, sizes, restore_ctx) -> None:
    raw, value = stream_value
    data = compress(raw, enc)
    c = Masked(Masker(DS, b"k"), Session(), {}, restorable=False, restore=restore_ctx,
               dialect="openai")
    sm = StreamMasker(c, decoder=StreamDecoder(enc) if enc else None)
    out: list[bytes] = []
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out += sm(data[i:i + n])
        i += n
        k += 1
    out += sm(b"")
    joined = b"".join(out)
    # with restore on, the agent gets its own originals back; the masked copy is checked
    checked = sm.masked_copy() if restore_ctx and sm.masked_copy() is not None else joined
    if not restore_ctx:
        assert_masked(joined, value)
    assert_masked(checked, value)

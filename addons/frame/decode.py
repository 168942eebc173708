"""The one strict, bounded body decoder every step reads through (policy, masking, sessions,
the recorder). Pure: no mitmproxy import; the flow helpers only read `flow.request` /
`flow.response` attributes.

Why one decoder: when two steps parse a body differently, an agent hides what one of them
checks in what only the other understands (a UTF-8 BOM made a JSON body "not JSON" to policy
while masking parsed it and the upstream read it). Here every step gets the same bytes, the
same text and the same JSON value, decoded once per flow and body.

Decoding, in order:
1. Content-Encoding, undone right to left: gzip/x-gzip (several members), deflate (zlib or
   raw), br, zstd, identity. Anything else is refused (415). Every stage is a streaming
   decompressor whose output is capped by an absolute limit AND a ratio to the wire size, so
   a bomb costs at most the cap (never `zlib.decompress(whole)`; mitmproxy's `.content`
   decompresses without any limit). At most MAX_CODINGS stages.
2. Charset: a BOM wins (UTF-32 LE/BE before UTF-16 LE/BE, UTF-8). JSON then follows RFC 8259
   / RFC 4627: no BOM -> the NUL pattern of the first four bytes tells UTF-16/32 LE/BE,
   otherwise UTF-8 (a charset parameter is ignored for JSON, exactly as JSON parsers do);
   other text uses the Content-Type charset, then the same NUL sniffing, then UTF-8.
   Decoding is strict: bytes that are not valid in the charset are an error, never replaced.
3. JSON: parsed when the media type says JSON, or when any other (non-multipart) body's
   text starts with `{` or `[` and parses. Duplicate keys are refused (parsers disagree on
   which wins). A body declared as JSON that does not parse is an error, not "no JSON".
"""

from __future__ import annotations

import codecs
import io
import json
import re
import sys
import threading
import weakref
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

MAX_BYTES = 16 * 1024 * 1024    # absolute cap on a decoded body (= masking's default)
MAX_RATIO = 200                 # decoded bytes per wire byte ...
RATIO_FLOOR = 1024 * 1024       # ... above this floor (tiny, very repetitive bodies are fine)
MAX_CODINGS = 4                 # stacked content-encodings
_CHUNK = 64 * 1024

_NON_ASCII = re.compile(r"[^\x00-\x7f]+")

JSON_MIMES = ("application/json", "application/jsonl", "application/x-ndjson")


class DecodeError(ValueError):
    """The body cannot be decoded; `status` 400 (malformed), 413 (too large), 415 (unsupported).
    The message names the problem, never body content."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class TooLarge(DecodeError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"decoded body over {limit} bytes", 413)
        self.limit = limit


def output_cap(wire_len: int, max_bytes: int = MAX_BYTES, max_ratio: int = MAX_RATIO) -> int:
    """How many decoded bytes a body of `wire_len` bytes may expand to."""
    return min(max_bytes, max(RATIO_FLOOR, wire_len * max_ratio))


# ---------------------------------------------------------------- content-encoding
def codings_of(content_encoding: str | None) -> list[str]:
    return [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]


def decompress(raw: bytes, content_encoding: str | None, *, max_bytes: int = MAX_BYTES,
               max_ratio: int = MAX_RATIO) -> bytes:
    """`raw` with its Content-Encoding undone, at most `output_cap` bytes (TooLarge beyond).
    Raises DecodeError for an unknown coding or a corrupt / truncated stream."""
    codings = [c for c in codings_of(content_encoding) if c != "identity"]
    if len(codings) > MAX_CODINGS:
        raise DecodeError(f"more than {MAX_CODINGS} content-encodings", 415)
    cap = output_cap(len(raw), max_bytes, max_ratio)
    if len(raw) > max_bytes:
        raise TooLarge(max_bytes)
    data = raw
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            data = _inflate(data, 16 + zlib.MAX_WBITS, cap, multi=True)
        elif coding == "deflate":
            # RFC 9110 says zlib-wrapped; raw deflate is common in the wild: tell by header
            wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and \
                (data[0] << 8 | data[1]) % 31 == 0
            data = _inflate(data, zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS, cap,
                            multi=False)
        elif coding == "br":
            data = _unbrotli(data, cap)
        elif coding == "zstd":
            data = _unzstd(data, cap)
        else:
            raise DecodeError(f"unsupported content-encoding {coding[:40]!r}", 415)
    return data


def _inflate(data: bytes, wbits: int, cap: int, *, multi: bool) -> bytes:
    out = bytearray()
    rest = data
    try:
        while True:
            d = zlib.decompressobj(wbits)
            buf = rest
            while True:
                out += d.decompress(buf, cap + 1 - len(out))
                if len(out) > cap:
                    raise TooLarge(cap)
                buf = d.unconsumed_tail
                if not buf or d.eof:
                    break
            if not d.eof:
                raise DecodeError("truncated compressed body", 400)
            rest = d.unused_data
            if not rest or not multi:
                break  # trailing garbage after raw/zlib deflate is ignored, as zlib does
    except zlib.error:
        raise DecodeError("corrupt compressed body", 400) from None
    return bytes(out)


def _unbrotli(data: bytes, cap: int) -> bytes:
    import brotli
    d = brotli.Decompressor()
    try:
        out = bytearray(d.process(data, output_buffer_limit=cap + 1))
        while len(out) <= cap and not d.is_finished() and not d.can_accept_more_data():
            out += d.process(b"", output_buffer_limit=cap + 1 - len(out))
    except brotli.error:
        raise DecodeError("corrupt compressed body", 400) from None
    if len(out) > cap:
        raise TooLarge(cap)
    if not d.is_finished():
        raise DecodeError("truncated compressed body", 400)
    return bytes(out)


def _unzstd(data: bytes, cap: int) -> bytes:
    import zstandard
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data),
                                                           read_across_frames=True)
        while True:
            chunk = reader.read(min(_CHUNK, cap + 1 - len(out)))
            if not chunk:
                break
            out += chunk
            if len(out) > cap:
                raise TooLarge(cap)
    except zstandard.ZstdError:
        raise DecodeError("corrupt compressed body", 400) from None
    return bytes(out)


# ---------------------------------------------------------------- media type and charset
def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """('application/json', {'charset': 'utf-8'}) from a Content-Type header."""
    if not value:
        return "", {}
    mime, *rest = value.split(";")
    params = {}
    for p in rest:
        k, sep, v = p.partition("=")
        if sep:
            params[k.strip().lower()] = v.strip().strip('"')
    return mime.strip().lower(), params


_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def sniff_bom(data: bytes) -> tuple[str, int] | None:
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return codec, len(bom)
    return None


def sniff_nuls(data: bytes) -> str | None:
    """RFC 4627 section 3: the first two characters of JSON text are ASCII, so the pattern
    of NUL bytes in the first four octets tells the encoding (also right for other text
    starting with two ASCII characters)."""
    if len(data) < 2:
        return None
    b = data[:4]
    if len(b) >= 4:
        if b[0] == 0 and b[1] == 0 and b[2] == 0 and b[3]:
            return "utf-32-be"
        if b[0] and b[1] == 0 and b[2] == 0 and b[3] == 0:
            return "utf-32-le"
    if b[0] == 0 and b[1]:
        return "utf-16-be"
    if b[0] and b[1] == 0:
        return "utf-16-le"
    return None


def is_json_mime(mime: str) -> bool:
    return mime == "application/json" or mime.endswith("+json")


def charset_of(data: bytes, mime: str, params: dict[str, str]) -> tuple[str, int]:
    """(Python codec name, BOM length) for a decoded body."""
    bom = sniff_bom(data)
    if bom is not None:
        return bom
    declared = params.get("charset", "").strip().lower()
    sniffed = sniff_nuls(data) or "utf-8"
    if declared and not is_json_mime(mime):
        try:
            codec = codecs.lookup(declared).name
        except LookupError:
            raise DecodeError(f"unknown charset {declared[:40]!r}", 415) from None
        if codec != sniffed and _reads_other_ascii(data, codec, sniffed):
            raise DecodeError(f"charset {declared[:40]!r} reads this body differently "
                              f"from {sniffed}", 415)
        return codec, 0
    return sniffed, 0


def _reads_other_ascii(data: bytes, codec: str, sniffed: str) -> bool:
    """Whether `data`, valid in the charset a reader that ignores the charset parameter
    sniffs (as JSON parsers and most form parsers do), reads as other ASCII text in the
    declared `codec` (EBCDIC, UTF-16/32, UTF-7, ISO-2022 …): one step would judge one text
    and the upstream read another. A Latin-1/UTF-8 mix-up differs only in non-ASCII
    characters and is not refused."""
    try:
        plain = codecs.decode(data, sniffed, "strict")
    except UnicodeDecodeError:
        return False  # only the declared reading is text
    try:
        other = codecs.decode(data, codec, "strict")
    except (UnicodeDecodeError, LookupError):
        return True  # only the sniffed reading is text: the one the upstream may take
    if other == plain:
        return False
    return _NON_ASCII.sub("", other) != _NON_ASCII.sub("", plain)


# ---------------------------------------------------------------- JSON
class DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise DuplicateKey
    return d


class NumberOutOfRange(ValueError):
    """A JSON number too large for a double (it would read as infinity)."""


_INFINITIES = (float("inf"), float("-inf"))


class JsonFloat(float):
    """A JSON number with a fraction or exponent, remembering how it was written: masking
    checks `4111111111111111.0` as written, and reads the same parse every other step reads
    (one parse per body). A float for everyone else: compares, hashes, formats (`repr`,
    `json.dumps`, tnetstring) exactly as the float it equals."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> JsonFloat:
        f = super().__new__(cls, text)
        if f in _INFINITIES:
            # 1e400 reads as inf, which every serialiser writes as `Infinity` (not JSON): a
            # masked body would go upstream invalid. Outside I-JSON's range (RFC 7493 2.2).
            raise NumberOutOfRange(text[:40])
        f.text = text
        return f

    def __reduce__(self) -> tuple[Any, tuple[str]]:  # copy / pickle keep the written text
        return (JsonFloat, (self.text,))


def loads_strict(text: str) -> Any:
    """json.loads refusing duplicate keys, non-integer numbers as JsonFloat.
    Raises DecodeError."""
    try:
        if type(text) is str:
            # json.loads(text, <these hooks>) is this BOM check and a new JSONDecoder with
            # them (its C scanner built again, ~2 us a body); _DECODER has the same hooks
            if text.startswith("\ufeff"):
                raise ValueError("Unexpected UTF-8 BOM")
            return _DECODER.decode(text)
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_float=JsonFloat)
    except DuplicateKey:
        raise DecodeError("JSON object with duplicate keys", 400) from None
    except NumberOutOfRange:
        raise DecodeError("JSON number out of range (larger than a double)", 400) from None
    except (ValueError, RecursionError):
        raise DecodeError("body is not valid JSON", 400) from None


_UNSET: Any = object()


# ---------------------------------------------------------------- incremental JSON parse
# An LLM request re-sends its whole history every turn, so parsing it costs O(history):
# 0.15 ms for the 119 KB of turn 40 in the multi-turn bench, every step reading it after.
# With a memo key (the agent's identity AND session, from policy), the text up to the end
# of the last item of the request's message list is remembered with the values parsed
# from it; the next body of the session that starts with exactly that text (one memcmp)
# takes those values as they are and parses only what follows. A top-level object is
# read here key by key (values by the json module's own scanner, with the same hooks as
# loads_strict), so the items' end positions are known. Whatever this reader finds
# unusual (another shape, an error, a duplicate key, deep nesting) it leaves to
# loads_strict, which answers as it always did: the value, or the error, is exactly a full
# parse's (tests/frame/test_decode_memo.py, differential). The items reused are the very
# objects of the previous parse: nobody changes a parsed body (masking copies on write).
MEMO_LISTS = ("messages", "input")
MEMO_MIN_CHARS = 8192           # below this a full parse costs less than remembering it
# more brackets than this after the reused text: loads_strict (its recursion limit is
# counted from the document's root, ours from each item)
MEMO_MAX_BRACKETS = 4096
_WS = re.compile(r"[ \t\n\r]*")
_JSON_WS = frozenset(" \t\n\r")
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_float=JsonFloat)
_SCAN = _DECODER.scan_once
_scanstring = json.decoder.scanstring


class ParsePrefix(NamedTuple):
    """What a session's last parse left for its next one: the text up to the end of the
    list's last item, the top-level pairs before the list, the list's key and items."""
    text: str
    before: tuple[tuple[str, Any], ...]
    key: str
    items: tuple[Any, ...]
    generation: int
    cost: int         # bytes charged to the memo: the text and `held`
    held: int = 0     # bytes of the parsed values (before, items), as _held counts them


class ParseMemos:
    """ParsePrefix per memo key, bounded: `max_bytes` in all (text and values, estimated
    at twice the text's size), `max_entry` per body, one identity (the part of the key
    before NUL) at most 1/`identity_share` of the bytes — an identity over it loses its
    own least recently used entries, never another's —, expiring after `idle_ttl`.
    In memory only; a miss only costs a full parse. Thread-safe. (Half per identity, not
    a quarter: agents often share one identity; the bench's 20 x 120 KB histories, one
    token, need ~5 MB, and a quarter of 16 MiB evicted them in the last turns.)"""

    def __init__(self, max_bytes: int = 16 << 20, max_entry: int = 4 << 20,
                 identity_share: int = 2, idle_ttl: float = 3600.0,
                 clock: Any = None) -> None:
        import time
        self._entries: OrderedDict[str, tuple[ParsePrefix, float]] = OrderedDict()
        self._ident_bytes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self.max_entry = max_entry
        self.identity_share = max(1, identity_share)
        self.idle_ttl = idle_ttl
        self.bytes = 0
        self._clock = clock or time.monotonic
        self._gen = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # never show text
        return f"<ParseMemos {len(self._entries)} entries, {self.bytes} bytes>"

    @staticmethod
    def _ident(key: str) -> str:
        return key.partition("\x00")[0]

    def next_generation(self) -> int:
        with self._lock:
            self._gen += 1
            return self._gen

    def get(self, key: str) -> ParsePrefix | None:
        now = self._clock()
        with self._lock:
            got = self._entries.get(key)
            if got is None:
                return None
            if now - got[1] > self.idle_ttl:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return got[0]

    def put(self, key: str, prefix: ParsePrefix) -> None:
        if prefix.cost > self.max_entry:
            with self._lock:
                if key in self._entries:
                    self._drop(key)
            return
        ident = self._ident(key)
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (prefix, self._clock())
            self.bytes += prefix.cost
            self._ident_bytes[ident] = self._ident_bytes.get(ident, 0) + prefix.cost
            share = self.max_bytes // self.identity_share
            if self._ident_bytes[ident] > share:
                for k in [k for k in self._entries if k != key and self._ident(k) == ident]:
                    if self._ident_bytes[ident] <= share:
                        break
                    self._drop(k)
            while self.bytes > self.max_bytes and len(self._entries) > 1:
                oldest = next(iter(self._entries))
                self._drop(oldest if oldest != key else list(self._entries)[1])

    def _drop(self, key: str) -> None:  # the lock held
        prefix, _ = self._entries.pop(key)
        self.bytes -= prefix.cost
        ident = self._ident(key)
        left = self._ident_bytes.get(ident, 0) - prefix.cost
        if left > 0:
            self._ident_bytes[ident] = left
        else:
            self._ident_bytes.pop(ident, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._ident_bytes.clear()
            self.bytes = 0


MEMOS = ParseMemos()


class _Parsed(NamedTuple):
    doc: dict[str, Any]
    generation: int   # of this parse's memo (0: none left)
    reused: int       # items taken from the previous parse ...
    reused_from: int  # ... of this generation (0: none)
    key: str | None   # the message list's key (MEMO_LISTS), None without one
    new_chars: int = -1  # characters past the previous parse's text (-1: not continued)


def memo_new_chars(text: str, key: str, memos: ParseMemos | None = None) -> int | None:
    """How much of `text` follows what the session's parse memo already holds (its
    parse would take the rest as it is), or None when the memo does not continue it."""
    prev = (MEMOS if memos is None else memos).get(key)
    if prev is None or not text.startswith(prev.text):
        return None
    return len(text) - len(prev.text)


def parse_memo(text: str, key: str, memos: ParseMemos | None = None) -> _Parsed | None:
    """`text` (a JSON object) parsed with the session's memo, or None when loads_strict
    must parse it (not a plain object, invalid, a duplicate key, deep nesting)."""
    memos = MEMOS if memos is None else memos
    prev = memos.get(key)
    if prev is not None and not text.startswith(prev.text):
        prev = None
    got = _read_object(text, prev)
    if got is None:
        return None
    doc, lst_key, before, items, last_end = got
    gen = 0
    if lst_key is not None and items:
        ptext = text[:last_end] if prev is None or last_end != len(prev.text) else prev.text
        # charged by real size: the text's str object (1, 2 or 4 bytes a character: one
        # emoji makes all of it 4) and the values parsed from it; the items a continued
        # parse reuses are the previous prefix's very objects, so only the new ones are
        # walked
        held = prev.held + _held(items[len(prev.items):]) if prev is not None \
            else _held(items) + _held((before,))
        kept = tuple(items)
        prefix = ParsePrefix(ptext, before, lst_key, kept, memos.next_generation(),
                             sys.getsizeof(ptext) + sys.getsizeof(kept) + held, held)
        memos.put(key, prefix)
        gen = prefix.generation
    if prev is None:
        return _Parsed(doc, gen, 0, 0, lst_key)
    return _Parsed(doc, gen, len(prev.items), prev.generation, lst_key,
                   len(text) - len(prev.text))


def _held(values: Any) -> int:
    """Bytes the parsed JSON values take (sys.getsizeof of every object under them; a
    string shared by several, such as a repeated key, counted each time: an upper bound).
    Why not a multiple of the text's length: what a character of JSON text costs once
    parsed depends on the shape ("[1000,1001,…]": a 32-byte int per 5 characters; many
    small objects: ~200 bytes each), 2.4-2.7x more than twice the text in
    tests/frame/test_decode_memo.py's hostile shapes."""
    n = 0
    stack = list(values)
    size = sys.getsizeof
    while stack:
        o = stack.pop()
        n += size(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return n


def _read_object(text: str, prev: ParsePrefix | None) -> tuple[Any, ...] | None:
    """(doc, list key, pairs before the list, items, end of the last item) or None."""
    ws = _WS.match
    pairs: list[tuple[str, Any]] = []
    keys: set[str] = set()
    lst_key: str | None = None
    before: tuple[tuple[str, Any], ...] = ()
    items: list[Any] = []
    last_end = -1
    try:
        if prev is not None:
            before, lst_key = prev.before, prev.key
            pairs.extend(before)
            keys.update(k for k, _ in before)
            keys.add(lst_key)
            items.extend(prev.items)
            i = last_end = len(prev.text)
            if _deep(text, i):
                return None
            i, last_end = _read_items(text, i, items)
            pairs.append((lst_key, items))
        else:
            if _deep(text, 0):
                return None
            i = ws(text, 0).end()
            if text[i:i + 1] != "{":
                return None
            i = ws(text, i + 1).end()
            if text[i:i + 1] == "}":
                return None  # {}: nothing to remember
            # the pairs up to the memo list's end, or to the object's '}' without one
            got = _read_pairs_start(text, i, pairs, keys)
            if not isinstance(got, tuple):
                return _finish(text, got, pairs)
            i, lst_key, last_end = got
            before = tuple(pairs[:-1])
            items = pairs[-1][1]
        # after the list: the rest of the object
        i = ws(text, i).end()
        c = text[i:i + 1]
        while c == ",":
            i = ws(text, i + 1).end()
            if text[i:i + 1] != '"':
                return None
            k, i = _scanstring(text, i + 1, True)
            if k in keys:
                return None
            keys.add(k)
            i = ws(text, i).end()
            if text[i:i + 1] != ":":
                return None
            v, i = _SCAN(text, ws(text, i + 1).end())
            pairs.append((k, v))
            i = ws(text, i).end()
            c = text[i:i + 1]
        if c != "}":
            return None
        if ws(text, i + 1).end() != len(text):
            return None
    except (StopIteration, ValueError, RecursionError, IndexError):
        return None  # (DuplicateKey is a ValueError)
    return dict(pairs), lst_key, before, items, last_end


def _read_items(text: str, i: int, items: list[Any]) -> tuple[int, int]:
    """Items of an array from `i` (just after an item) to its ']': (position after ']',
    end of the last item). Raises ValueError when malformed."""
    ws = _WS.match
    last_end = i
    i = ws(text, i).end()
    c = text[i:i + 1]
    if c == "]":
        return i + 1, last_end
    if c != ",":
        raise ValueError
    i += 1
    while True:
        v, i = _SCAN(text, ws(text, i).end())
        items.append(v)
        last_end = i
        i = ws(text, i).end()
        c = text[i:i + 1]
        if c == "]":
            return i + 1, last_end
        if c != ",":
            raise ValueError
        i += 1


def _read_pairs_start(text: str, i: int, pairs: list[tuple[str, Any]], keys: set[str]
                      ) -> Any:
    """Pairs of the top-level object from its first key: stops after the first memo list
    with items ((position, key, end of its last item)), else at the closing '}' (its
    position). Raises ValueError when malformed or a key repeats."""
    ws = _WS.match
    while True:
        i = ws(text, i).end()
        if text[i:i + 1] != '"':
            raise ValueError
        k, i = _scanstring(text, i + 1, True)
        if k in keys:
            raise ValueError
        keys.add(k)
        i = ws(text, i).end()
        if text[i:i + 1] != ":":
            raise ValueError
        i = ws(text, i + 1).end()
        if k in MEMO_LISTS and text[i:i + 1] == "[":
            j = ws(text, i + 1).end()
            if text[j:j + 1] != "]":
                # the whole list by the scanner (as a full parse reads it); its last
                # item ends where the white space before the closing ']' starts
                items, i = _SCAN(text, i)
                last_end = i - 1
                while text[last_end - 1] in _JSON_WS:
                    last_end -= 1
                pairs.append((k, items))
                return i, k, last_end
        v, i = _SCAN(text, i)
        pairs.append((k, v))
        i = ws(text, i).end()
        c = text[i:i + 1]
        if c == "}":
            return i
        if c != ",":
            raise ValueError
        i += 1


def _deep(text: str, i: int) -> bool:
    """Could the text from `i` nest MEMO_MAX_BRACKETS deep? (Nesting d takes 2d
    characters: only a long text is counted.)"""
    return len(text) - i >= 2 * MEMO_MAX_BRACKETS and \
        text.count("[", i) + text.count("{", i) >= MEMO_MAX_BRACKETS


def _finish(text: str, i: int, pairs: list[tuple[str, Any]]) -> tuple[Any, ...] | None:
    """An object without a memo list, read to its '}' at `i`: nothing to remember."""
    if _WS.match(text, i + 1).end() != len(text):
        return None
    return dict(pairs), None, (), [], -1


@dataclass
class Body:
    """A decoded body: `data` (Content-Encoding undone), `text` and `json` on first use."""

    data: bytes
    mime: str = ""
    params: dict[str, str] = field(default_factory=dict)
    _text: Any = field(default=_UNSET, repr=False)
    _json: Any = field(default=_UNSET, repr=False)
    _charset: str = field(default="", repr=False)
    # set before the first `json`: the session's parse memo key (see parse_memo); then
    # this parse's memo generation, and how many items of the message list it took from
    # which earlier generation (the very objects that parse made)
    memo_key: str | None = field(default=None, repr=False)
    generation: int = field(default=0, repr=False)
    reused: int = field(default=0, repr=False)
    reused_from: int = field(default=0, repr=False)
    memo_list: str | None = field(default=None, repr=False)  # the list those items are in
    # characters this parse read past the session's previous body (-1: it did not continue
    # one), so a later step knows how much of the body is new without comparing again
    new_chars: int = field(default=-1, repr=False)

    @property
    def charset(self) -> str:
        if not self._charset:
            self._charset, _ = charset_of(self.data, self.mime, self.params)
        return self._charset

    @property
    def text(self) -> str:
        """The body as text, BOM removed. Raises DecodeError when it is not valid text."""
        if self._text is _UNSET:
            codec, skip = charset_of(self.data, self.mime, self.params)
            self._charset = codec
            try:
                self._text = codecs.decode(self.data[skip:], codec, "strict")
            except (UnicodeDecodeError, LookupError):
                self._text = DecodeError(f"body is not valid {codec} text", 400)
        if isinstance(self._text, DecodeError):
            raise self._text
        return self._text

    @property
    def json(self) -> Any:
        """The JSON value; None when the body is empty or not JSON. Raises DecodeError for a
        body declared as JSON that does not parse, or JSON with duplicate keys."""
        if self._json is _UNSET:
            self._json = self._parse()
        if isinstance(self._json, DecodeError):
            raise self._json
        return self._json

    def _parse(self) -> Any:
        if not self.data:
            return None
        declared = is_json_mime(self.mime)
        if self.mime.startswith("multipart/"):
            return None  # parts, not one JSON document
        # any other media type that holds JSON is read as JSON: a provider that parses
        # JSON whatever the Content-Type says must not get a body policy read as a form
        try:
            text = self.text
        except DecodeError as e:
            # a charset that is unknown or reads the body unlike the sniffed one: refused
            # whatever the media type (the upstream may read it as JSON all the same)
            return e if declared or e.status == 415 else None
        head = text.lstrip()[:1]
        if head not in ("{", "["):
            if not declared:
                return None
            if not text.strip():
                return None
        key = self.memo_key
        if key is not None and head == "{" and len(text) >= MEMO_MIN_CHARS:
            got = parse_memo(text, key)
            if got is not None:
                (self.generation, self.reused, self.reused_from, self.memo_list,
                 self.new_chars) = got[1:]
                return got.doc
        try:
            return loads_strict(text)
        except DecodeError as e:
            if declared or "duplicate" in e.reason:
                return e
            return None


def decode_body(raw: bytes, content_encoding: str | None, content_type: str | None, *,
                max_bytes: int = MAX_BYTES, max_ratio: int = MAX_RATIO) -> Body:
    mime, params = parse_content_type(content_type)
    return Body(decompress(raw, content_encoding, max_bytes=max_bytes, max_ratio=max_ratio),
                mime, params)


# ---------------------------------------------------------------- per flow, per body
_cache: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, ...]]] = \
    weakref.WeakKeyDictionary()
_lock = threading.Lock()


# where coding_and_type leaves its answer on a Headers object: (fields, answer)
_CODING_AND_TYPE = "_agentgate_coding_and_type"


def coding_and_type(headers: Any) -> tuple[str, str]:
    """(Content-Encoding, Content-Type) exactly as `headers.get(name, "")` gives them (all
    values of a repeated field joined with ", "), in one pass over mitmproxy's fields:
    every step asks for both on every flow, and each `get` is a scan of its own.
    The answer is kept on the Headers object with the very `fields` tuple it was read
    from: policy, sessions, masking and the shared decode ask ~8 times per flow, and
    `fields` is an immutable tuple of bytes that every change of the headers replaces
    (mitmproxy assigns a new one), so the same tuple object means the same answer."""
    fields = getattr(headers, "fields", None)
    if not isinstance(fields, tuple):
        return headers.get("content-encoding", ""), headers.get("content-type", "")
    memo = getattr(headers, "__dict__", None)
    if memo is not None:
        hit = memo.get(_CODING_AND_TYPE)
        if hit is not None and hit[0] is fields:
            return hit[1]
    got = _coding_and_type(fields)
    if memo is not None:
        memo[_CODING_AND_TYPE] = (fields, got)
    return got


def _coding_and_type(fields: tuple[Any, ...]) -> tuple[str, str]:
    enc: list[str] = []
    ctype: list[str] = []
    for k, v in fields:
        n = len(k)
        if n == 16 or n == 12:
            k = k.lower()
            if k == b"content-encoding":
                enc.append(v.decode("utf-8", "surrogateescape"))
            elif k == b"content-type":
                ctype.append(v.decode("utf-8", "surrogateescape"))
    return ", ".join(enc), ", ".join(ctype)


def _message_body(flow: Any, part: str, max_bytes: int, max_ratio: int,
                  memo_key: str | None = None) -> Body | None:
    msg = getattr(flow, part, None)
    if msg is None:
        return None
    raw = msg.raw_content
    if raw is None:
        raise DecodeError("the body is streamed and cannot be inspected", 413)
    enc, ctype = coding_and_type(msg.headers)
    key = (raw, enc, ctype, max_bytes, max_ratio)
    with _lock:  # policy decodes large bodies in a worker thread
        slot = _cache.setdefault(flow, {})
        hit = slot.get(part)
    # `is` on the raw bytes: an addon that rewrites the body (masking) makes a new object
    if hit is not None and hit[0] is raw and hit[1:-1] == key[1:]:
        value = hit[-1]
    else:
        try:
            value = decode_body(raw, enc, ctype, max_bytes=max_bytes, max_ratio=max_ratio)
        except DecodeError as e:
            value = e
        with _lock:
            slot[part] = (*key, value)
    if isinstance(value, DecodeError):
        raise value
    if memo_key is not None and value.memo_key is None and value._json is _UNSET:
        value.memo_key = memo_key
    return value


def release(flow: Any, part: str | None = None) -> None:
    """Forget the flow's decoded `part` ("request" or "response"; None: both) once no step
    will read it again: the request's when the request hooks are done (before the upstream
    round trip, which may take seconds), everything when the flow ends. A later call of
    request_body/response_body decodes again (same bytes, same result).

    Why not leave it to the weak reference: mitmproxy's finished flows die in reference
    cycles (its HTTP stream layer keeps bound methods of itself), so a flow is freed by the
    cyclic GC's occasional full collection, not when it ends. Until then its entry here
    kept the decoded text, the parsed JSON and, after masking rewrote the body, the
    original bytes: 100 KB bodies at c=16 had ~80-160 such dead flows alive at once."""
    with _lock:
        if part is None:
            _cache.pop(flow, None)
            return
        slot = _cache.get(flow)
        if slot is not None:
            slot.pop(part, None)


def parsed_request(flow: Any, raw: bytes) -> Body | None:
    """The flow's request Body when an earlier step already parsed `raw` (that very
    object) as JSON, else None. Looks only: never decodes or parses (its `new_chars`,
    `reused`, `reused_from` tell what the parse took from the session's memo)."""
    with _lock:
        hit = _cache.get(flow, {}).get("request")
    if hit is None or hit[0] is not raw:
        return None
    value = hit[-1]
    if isinstance(value, DecodeError) or value._json is _UNSET:
        return None
    return value


def request_body(flow: Any, *, max_bytes: int = MAX_BYTES,
                 max_ratio: int = MAX_RATIO, memo_key: str | None = None) -> Body | None:
    """The flow's request body, decoded once per body (None without a request).
    Raises DecodeError (streamed, too large, unsupported, corrupt). `memo_key`: the
    agent's identity and session (policy's session_key), so that the JSON parse takes
    what the session's previous body shared with this one (parse_memo); only before the
    body is first parsed."""
    return _message_body(flow, "request", max_bytes, max_ratio, memo_key)


def response_body(flow: Any, *, max_bytes: int = MAX_BYTES,
                  max_ratio: int = MAX_RATIO) -> Body | None:
    return _message_body(flow, "response", max_bytes, max_ratio)

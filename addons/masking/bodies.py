"""Where masking applies inside an HTTP body (pure: no mitmproxy import).

A body is decoded (content-encoding, then its media type) into *slots*: every string and
integer of a JSON document, every key and value of a form, every text part of a multipart
body, or the whole text. The slots are joined into ONE text and the detectors run once
over it (one pass per body, whatever its shape), then each finding is mapped back to the
slot(s) it covers and the document is rebuilt. Nothing changes byte-wise when nothing is
found: the original body is forwarded as is.

Joining rules, so that a value split across fields is still caught where it is plausible
without gluing unrelated fields together:
- consecutive `text` parts of one content list (OpenAI chat/responses content parts,
  Anthropic content and system blocks, or any list of `{"text": ...}` objects) are joined
  with nothing between them, as the model reads them: `["call 555-01", "23-4567"]` is one
  phone number; the replacement goes where the value starts and the rest of it is removed
  from the following part;
- every other slot is separated by a newline (a newline cannot start or end a value, so
  the first pass never makes a finding out of two unrelated fields);
- a second pass looks across the boundaries of *sibling runs*: consecutive strings of one
  JSON container (array items, the values of one object) and, in NDJSON, the strings at the
  same JSON path on consecutive lines (token streams). Each boundary is looked at through
  a bounded window (SPLIT_WINDOW characters on each side, whole slots when shorter, so a
  card spread over sixteen one-digit items is seen), joined with nothing between; only a
  finding that crosses a boundary and overlaps nothing of the first pass is taken, and its
  positions are mapped back to the slots it covers.

JSON-aware details:
- JSON string escapes (`\\u0034`) are gone after parsing, so the detectors see real text;
- a string that itself holds a JSON object or array (OpenAI tool-call `arguments`, tool
  results, webhook payloads) is parsed and walked too, and re-serialised only if changed;
- integers are checked as text (a card number sent as a JSON number becomes a string);
- object keys are checked as well;
- every string is walked, whatever its key: `format`, `id`, `type`, `status`, `model` …
  may carry user text (JSON-schema descriptions, tool arguments) and are masked when a
  detector finds a value in them. The only strings left alone are proven binary by their
  structure: for the LLM dialects, a `data:…;base64,` URL or a base64 payload field
  (`source.data` of a base64 source, `input_audio.data`, `file_data`, `b64_json`,
  `signature`, `encrypted_content`) whose value is strict base64 of at least
  BINARY_MIN_LEN characters (what base64 hides, no detector reads anyway).

With a MessageCache (requests of an LLM dialect whose `messages` / `input` list holds only
message objects), each message is its own set of slots, with the last
`masker.context_len` characters of the message before it as left context (so a context
word such as "aws_secret_access_key" at the end of one message still confirms a key at
the start of the next); a message seen before with the same left context is not walked
or scanned again (see Masked._json_incremental). Message objects of a list are never
siblings for the cross-field pass, so the units see the same joins as the whole body.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import re
import secrets
import threading
import time
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Container
from itertools import chain, repeat
from sys import getsizeof as _sizeof
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlencode

from addons.frame import decode as _decode
from addons.frame.decode import JsonFloat, NumberOutOfRange, parse_content_type
from addons.masking.detectors import Finding
from addons.masking.masker import Findings, Masker, Session, count

try:  # a binary wheel: without it the standard library's encoder writes the same bytes
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised when the wheel is missing
    _orjson = None

LLM_DIALECTS = ("openai", "anthropic")
MAX_DEPTH = 256

# Fields of the LLM APIs whose value is an opaque base64 payload (skipped only when the
# value really is long, strict base64: see _is_binary_field).
BINARY_KEYS = frozenset({"b64_json", "file_data", "signature", "encrypted_content"})
BINARY_MIN_LEN = 256
LOGPROB_KEYS = frozenset({"logprobs", "top_logprobs"})
# no key is known plain (an unknown masker, or none): every key is walked
_NO_KEYS: frozenset[str] = frozenset()
_DATA_URL = re.compile(r"\s*data:[\w.+-]+/[\w.+-]+(;[\w.+-]+=[^;,]*)*;base64,", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/_\-]+={0,2}", re.ASCII)
# characters on each side of a sibling boundary looked at by the cross-field pass (longer
# than any PII value written with separators; secrets split across fields are caught
# when each part is shorter than this)
SPLIT_WINDOW = 256
# between unrelated slots: two line ends, which no detector reads as one separator (a
# value's groups are split by ONE separator), so no finding bridges two fields
_BREAK = "\n\n"


# Masked._detect: both passes in one detector call where the detectors allow it (False:
# two calls, the reference the tests compare with)
USE_ONE_CALL = True

# the new messages of a request whose detection is one call (Masked._walk_ahead): at most
# about this many characters of them each (one call's text, and the slots held meanwhile)
BATCH_CHARS = 64 * 1024
# ... and only messages of at least this many characters with their left context (a
# shorter one may cost find() nearly nothing alone: its quick test, detectors._QUICK_LEN)
MIN_BATCH_CHARS = 256

# URL paths remembered as clean (nothing found) per masker, and the longest remembered
CLEAN_PATHS = 4096
CLEAN_PATH_MAX = 1024


def _counted(findings: Findings) -> int:
    return sum(e["count"] for e in findings.values())


class Unparseable(Exception):
    """The body cannot be masked: `status` 400 (malformed) or 415 (unsupported)."""

    def __init__(self, reason: str, status: int = 415) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class TooLarge(Exception):
    """The (decoded) body is over the configured limit."""


# a `\u` escape: `re`'s literal-prefix search is cheaper than str/bytes (r)find here, whose
# fast search stalls on the frequent last character 'u' (1 MB of prose: 0.32 vs 0.41-1.0 ms)
_ESC_U_STR = re.compile(r"\\u")
_ESC_U_BYTES = re.compile(rb"\\u")
# an HTTP header name (RFC 9110 token): a masked name that is no longer one is dropped
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# URL path characters left as they are when a masked segment is re-encoded
_PATH_SAFE = "!$&'()*+,;=:@~-._"
# name="…" / filename="…" / filename*=UTF-8''… in a multipart part's Content-Disposition
_DISP_PARAM = re.compile(r'(?i)(;\s*)(name|filename)(\*?)=("(?:[^"\\\r\n]|\\.)*"|[^;\r\n]*)')


# ---------------------------------------------------------------- content-encoding
def decode_content(raw: bytes, encoding: str, limit: int) -> bytes:
    """Undo `Content-Encoding` through the one bounded decoder (addons/frame/decode.py:
    gzip, deflate, br, zstd, right to left; absolute and ratio caps against bombs), so
    masking reads the same bytes as every other step."""
    try:
        return _decode.decompress(raw, encoding, max_bytes=limit)
    except _decode.TooLarge:
        raise TooLarge from None
    except _decode.DecodeError as e:
        raise Unparseable(e.reason, e.status) from None


def _text_charset(content: bytes, mime: str, params: dict[str, str]) -> str:
    """The charset a text or form body is masked in: the declared one, else UTF-8 — and
    only when the shared decoder (what policy reads) reads the body in that charset too.
    Refused (415): a declared charset that reads the body as other ASCII text than a
    reader ignoring it would (decode.charset_of), or bytes whose BOM or NUL pattern says
    another charset than the type (a binary body, or text in disguise)."""
    try:
        codec = _decode.charset_of(content, mime, params)[0]
        want = codecs.lookup(params.get("charset", "utf-8")).name
    except _decode.DecodeError as e:
        raise Unparseable(e.reason, e.status) from None
    except LookupError:
        raise Unparseable("body is not text in a known charset", 415) from None
    if codec != want and not codec.startswith(want + "-"):  # utf-16 declared, LE BOM
        raise Unparseable(f"body reads as {codec}, its type says {want}", 415)
    return want


def shared_json(body: _decode.Body) -> Any:
    """The shared decoder's JSON value of `body` when it is exactly what masking's own parse
    of `body.data` would give (a dict or list), else None (masking parses it itself).

    Both refuse duplicate keys and keep how numbers were written (JsonFloat); they agree
    on the text when json.loads would pick the charset the decoder picked (RFC 8259 BOM /
    NUL sniffing; a charset parameter of a non-JSON media type may differ) and the decoder
    decoded it strictly (json.loads allows lone surrogates: then it parses again here)."""
    try:
        doc = body.json
    except _decode.DecodeError:
        return None
    if not isinstance(doc, dict | list):
        return None
    data = body.data
    enc = json.detect_encoding(data)
    charset = body.charset
    if enc == "utf-8-sig":
        same = charset == "utf-8" and data.startswith(codecs.BOM_UTF8)
    elif enc in ("utf-16", "utf-32"):  # a BOM: both read it the same way
        same = charset.startswith(enc + "-")
    else:
        same = enc == charset
    return doc if same else None


# ---------------------------------------------------------------- slots
# A container's place in the document walked: (container, its parent's chain, its key
# there). The parent _OWNED: the container is ours (parsed here) and is changed in place;
# None: the root of a shared document (the flow's one parse, addons/frame/decode.py),
# which is never changed: a container is copied (shallow) the first time something in it
# changes, and its parent after it, up to a new root (copy on write).
_OWNED: Any = ("owned",)
Chain = tuple[Any, Any, Any]
# where a slot's new text goes: a function, or (chain, key) of a JSON value (no closure
# made per value: a body may hold millions)
Setter = Callable[[str], None] | tuple[Chain, Any]


class _Slots:
    """Strings of a document, joined into one text with their positions."""

    __slots__ = ("texts", "starts", "setters", "owners", "parts", "pos", "glue_key",
                 "subdocs", "llm", "forced", "sibs", "path_mode", "cow", "root", "_copies",
                 "_renamed", "floats", "known_keys", "plain_key")

    def __init__(self, llm: bool, cow: bool = False, masker: Any = None) -> None:
        self.texts: list[str] = []
        self.starts: list[int] = []
        self.setters: list[Setter] = []
        self.owners: list[int] = []
        self.parts: list[str] = []
        self.pos = 0
        self.glue_key: tuple[int, int] | None = None
        # (parent owner, setter, parsed object) of JSON documents nested in strings
        self.subdocs: list[tuple[int, Setter, Any]] = []
        self.llm = llm
        self.forced: set[int] = set()  # owners changed by the walk itself (logprobs dropped)
        # per slot: its sibling key (slots of one run share it), None for keys
        self.sibs: list[Any] = []
        # NDJSON: siblings are the strings at the same path on consecutive lines
        self.path_mode = False
        # copy on write: the document walked is shared, `root` is its changed copy (None:
        # unchanged); copies by id of the original container
        self.cow = cow
        self.root: Any = None
        self._copies: dict[int, Any] = {}
        # renamed keys by id of the (writable) dict: a value written later under its old
        # key lands under the new one (never the old key back, with the value unmasked)
        self._renamed: dict[int, dict[str, str]] = {}
        # a float that is not a JsonFloat was walked (NaN/Infinity constants, or a float
        # put there by code): _dump_bytes then leaves the document to the json module,
        # whose spelling of it ('1e-05', 'NaN') orjson's does not match
        self.floats = False
        # object keys the masker's detectors provably find nothing in (Masker.plain_key:
        # "content", "role", "finish_reason" ...) are not slots; every other key is, whatever
        # it looks like: a Hugging Face token is letters and '_' only, and a custom
        # detector may match any word. Without a masker that can tell: every key.
        self.plain_key: Callable[[str], bool] | None = getattr(masker, "plain_key", None)
        # (the masker's own dict, empty or not: what plain_key adds during this walk is seen)
        known = getattr(masker, "plain_keys", None) if self.plain_key is not None else None
        self.known_keys: Container[str] = known if known is not None else _NO_KEYS

    def writable(self, chain: Chain) -> Any:
        """The container of `chain` as it may be changed: itself when ours, else its copy
        (made now, and linked into its parent's writable copy)."""
        node, parent, key = chain
        if parent is _OWNED:
            return node
        c = self._copies.get(id(node))
        if c is None:
            c = dict(node) if isinstance(node, dict) else list(node)
            self._copies[id(node)] = c
            if parent is None:
                self.root = c
            else:
                self.put(parent, key, c)
        return c

    def put(self, chain: Chain, key: Any, value: Any) -> None:
        w = self.writable(chain)
        if self._renamed and isinstance(key, str):
            key = self._renamed.get(id(w), {}).get(key, key)
        w[key] = value

    def set(self, setter: Setter, value: str) -> None:
        """Write a slot's new text through its setter."""
        if type(setter) is tuple:
            self.put(setter[0], setter[1], value)
        else:
            setter(value)

    def rename(self, chain: Chain, old: str, new: str) -> None:
        w = self.writable(chain)
        items = [(new if k == old else k, v) for k, v in w.items()]
        w.clear()
        w.update(items)
        self._renamed.setdefault(id(w), {})[old] = new

    def root_chain(self, node: Any) -> Chain:
        """The chain of a document's root: copied on write when shared (`cow`)."""
        return (node, None if self.cow else _OWNED, None)

    def add(self, text: str, setter: Setter, owner: int,
            glue: tuple[int, int] | None = None, sib: Any = None) -> None:
        sep = "" if glue is not None and self.glue_key is not None and \
            glue == (self.glue_key[0], self.glue_key[1] + 1) else _BREAK
        if self.texts:
            self.parts.append(sep)
            self.pos += len(sep)
        self.texts.append(text)
        self.starts.append(self.pos)
        self.setters.append(setter)
        self.owners.append(owner)
        self.parts.append(text)
        self.pos += len(text)
        self.glue_key = glue
        self.sibs.append(sib)

    def add_string(self, text: str, setter: Setter, owner: int,
                   depth: int, glue: tuple[int, int] | None = None, sib: Any = None) -> None:
        """A string slot, or a nested JSON document when the string holds one."""
        head = text.lstrip()[:1]
        if head in ("{", "[") and len(text) >= 2:
            try:
                inner = loads(text)
            except DuplicateKeys:
                raise Unparseable("JSON object with duplicate keys", 400) from None
            except (ValueError, RecursionError):
                inner = None
            if isinstance(inner, dict | list):
                self.subdocs.append((owner, setter, inner))
                self.walk(inner, len(self.subdocs) - 1, depth + 1, _child(sib, "doc"),
                          (inner, _OWNED, None))  # parsed here: changed in place
                return
        self.add(text, setter, owner, glue, sib)

    def walk(self, node: Any, owner: int, depth: int = 0, path: Any = (),
             chain: Chain | None = None) -> None:
        """Add the strings of `node` (`chain`: its place; default: the document's root)."""
        if depth > MAX_DEPTH:
            raise Unparseable("JSON nested too deeply", 400)
        if not self.path_mode:
            path = None  # only NDJSON needs paths; a body may hold millions of values
        if chain is None:
            chain = self.root_chain(node)
        if isinstance(node, dict):
            self._walk_dict(node, owner, depth, path, chain=chain)
        elif isinstance(node, list):
            if len(node) > 1 and all(type(v) is int for v in node):
                # a list of integers is ONE slot, the numbers joined by commas: one string
                # for the whole list (token-id arrays stay cheap), and a value spread over
                # the items ([4111, 1111, 1111, 1111]) is read as written
                self.add(",".join(map(str, node)), self._int_list_setter(chain), owner)
                return
            # text parts first, adjacent, so consecutive parts of one list are glued; their
            # other fields after the list's text
            deferred: list[dict] = []
            ipath = _child(path, "[]")
            lsib = self._sib(node, ipath)
            for i, item in enumerate(node):
                if type(item) is int:  # _walk_value's slot of an integer, directly
                    self.add(str(item), (chain, i), owner, None, lsib)
                    continue
                if isinstance(item, dict) and isinstance(item.get("text"), str) and \
                        not (self.llm and _is_binary_field(item, "text", item["text"])):
                    if depth + 1 > MAX_DEPTH:
                        raise Unparseable("JSON nested too deeply", 400)
                    ichain = (item, chain, i)
                    self.add_string(item["text"], (ichain, "text"), owner,
                                    depth + 1, (id(node), i),
                                    self._sib(node, _child(ipath, "text")))
                    deferred.append(ichain)
                elif isinstance(item, dict):
                    self._walk_dict(item, owner, depth + 1, ipath, chain=(item, chain, i))
                else:
                    self._walk_value(chain, i, item, owner, depth + 1, ipath, lsib)
            for ichain in deferred:
                self._walk_dict(ichain[0], owner, depth + 1, ipath, skip_text=True,
                                chain=ichain)
        else:
            raise Unparseable("not a JSON document", 400)

    def _sib(self, container: Any, path: Any) -> Any:
        # one run per container in a document (its id); per path across NDJSON lines
        return path if self.path_mode else id(container)

    def _walk_dict(self, d: dict, owner: int, depth: int, path: Any = (),
                   skip_text: bool = False, *, chain: Chain) -> None:
        if depth > MAX_DEPTH:
            raise Unparseable("JSON nested too deeply", 400)
        llm = self.llm
        known, plain = self.known_keys, self.plain_key
        dsib = None if self.path_mode else id(d)
        # (a snapshot of the items: the loop changes no value but the one of its own key)
        for k, v in list(d.items()):
            # (_is_binary_field's own first test, here: no call for the usual value)
            if llm and isinstance(v, str) and len(v) >= BINARY_MIN_LEN and \
                    _is_binary_field(d, k, v):
                continue
            if llm and k in LOGPROB_KEYS and v and isinstance(v, dict | list):
                # the output again, one token per entry: no detector sees a value split
                # over tokens, so it cannot be masked there; drop it
                self.put(chain, k, None if isinstance(v, dict) else [])
                self.forced.add(owner)
                continue
            if skip_text and k == "text":
                continue  # added by the list walk
            if k not in known and (plain is None or not plain(k)):
                self._walk_key(chain, k, owner)
            t = type(v)
            if t is int and dsib is not None:
                # an integer (rows of data hold thousands): _walk_value's slot, directly
                self.add(str(v), (chain, k), owner, None, dsib)
            elif v is not None and t is not bool:
                self._walk_value(chain, k, v, owner, depth + 1, _child(path, k), dsib)

    def _walk_key(self, chain: Chain, k: str, owner: int) -> None:
        def rename(new: str) -> None:
            self.rename(chain, k, new)

        self.add(k, rename, owner)

    def _int_list_setter(self, chain: Chain) -> Callable[[str], None]:
        """Write a masked comma-joined integer list back: numbers stay numbers, a
        replacement becomes a string item (the value is gone; the list may get shorter)."""
        def set_(value: str) -> None:
            self.writable(chain)[:] = [int(x) if x.lstrip("-").isdigit() else x
                                       for x in value.split(",") if x]
        return set_

    def _walk_value(self, chain: Chain, key: Any, v: Any, owner: int, depth: int,
                    path: Any = None, sib: Any = None) -> None:
        if sib is None:
            sib = self._sib(chain[0], path)
        if isinstance(v, str):
            if v:
                self.add_string(v, (chain, key), owner, depth, sib=sib)
        elif isinstance(v, bool) or v is None:
            return
        elif isinstance(v, JsonFloat):
            # as written (what goes upstream when the body is left as it is) and as every
            # reader takes it, which is also how a re-serialisation spells it:
            # 41111111111111110e-1 is 4111111111111111.0
            self.add(v.text, (chain, key), owner, sib=sib)
            value = float.__repr__(v)
            if value != v.text:
                self.add(value, (chain, key), owner)
        elif isinstance(v, int | float):
            if type(v) is not int:
                self.floats = True  # (any float but a JsonFloat; an int subclass too)
            # every number, however short: a value may be spread over sibling numbers
            # ({"a": 4111, "b": 1111, …}; a list that is not all integers)
            self.add(str(v), (chain, key), owner, sib=sib)
        elif isinstance(v, dict | list):
            self.walk(v, owner, depth, path, (v, chain, key))


Crossing = list[tuple[str, str, list[tuple[int, int, int]]]]
# the cross-field pass's text: (text, plans, where each plan starts in it)
CrossText = tuple[str, list[tuple[list[int], list[str], "list[bool] | None"]], list[int]]


def _cross_findings(masker: Masker, slots: _Slots, found: list) -> Crossing:
    """Findings that cross the boundary between sibling slots (see the module doc):
    (entity, value, [(slot, local start, local end), …]) for those overlapping nothing the
    first pass found. (The two passes apart; Masked._detect makes them one call.)"""
    ct = _cross_text(masker, slots)
    if ct is None:
        return []
    return _crossing(slots, found, masker.find(ct[0]), ct, 0)


def _cross_text(masker: Masker, slots: _Slots) -> CrossText | None:
    """The cross-field pass's text and its plans (see _cross_findings), or None when no
    run of siblings needs one."""
    runs: dict[Any, list[int]] = {}
    for i, key in enumerate(slots.sibs):
        if key is not None:
            runs.setdefault(key, []).append(i)
    texts = slots.texts
    # Every run in one window text (runs apart by a break): one more detector pass. Each
    # run joined with nothing ('sk-proj-Xi' + '8tcN…' is one key) and, where a letter meets
    # a digit, once more with a space there ('cards' + '4111': a word boundary, as a reader
    # sees two fields, so a number's look-behind still sees its start). A crossing finding
    # starts in the tail of one slot and ends in the head of a later one: the first slot of
    # a run gives its tail, the last its head, the others both (whole when short).
    # A plan is one run laid out once (joined, or spaced); the text holds the plans apart by
    # a break. Where each piece of a slot lies is worked out only for the plans a finding
    # falls in (_lay_out, the same layout): a body of numbers holds a slot per number and
    # findings there are rare, so the bookkeeping per slot is gone from the usual body.
    # A run of fewer ASCII digits than any detector needs in digits alone (the numbers of
    # a row: '12' + '7' + '450') is left out: nothing can be found in it, and no
    # detector needs it as context (it holds no word, and its neighbours in this text
    # lie past a break either way: leaving it out only brings them closer). Rows of
    # small numbers otherwise made one long run of digits and breaks for the detectors.
    inert = getattr(getattr(masker, "detectors", None), "digits_alone_min", 0)
    plans: list[tuple[list[int], list[str], list[bool] | None]] = []
    spaced: list[tuple[list[int], list[str], list[bool] | None]] = []
    # each plan's text when every slot of its run is whole in it (no longer than
    # SPLIT_WINDOW: the usual run), made here as _lay_out would; None: _lay_out's windows
    laid: list[str | None] = []
    laid_spaced: list[str | None] = []
    w = SPLIT_WINDOW
    for idxs in runs.values():
        if len(idxs) > 1:
            run = [texts[i] for i in idxs]
            joined = "".join(run)
            if len(joined) < inert and joined.isascii() and joined.isdigit():
                continue
            short = len(joined) <= w or max(map(len, run)) <= w
            plans.append((idxs, run, None))
            laid.append(joined if short else None)
            gaps = _junctions(run, joined)
            if gaps is not None:
                spaced.append((idxs, run, gaps))
                laid_spaced.append(run[0] + "".join(
                    [" " + t if gap else t for t, gap in zip(run[1:], gaps, strict=True)])
                    if short else None)
    if not plans:
        return None
    plans += spaced
    laid += laid_spaced
    buf: list[str] = []
    plan_start: list[int] = []
    pos = 0
    for (idxs, run, gaps), text in zip(plans, laid, strict=True):
        if buf:
            buf.append(_BREAK)
            pos += len(_BREAK)
        plan_start.append(pos)
        if text is not None:
            buf.append(text)
            pos += len(text)
        else:
            pos = _lay_out(idxs, run, gaps, pos, buf, None)
    return "".join(buf), plans, plan_start


def _crossing(slots: _Slots, found: list, crossing: list, ct: CrossText, offset: int
              ) -> Crossing:
    """The crossing findings among `crossing` (the detectors' findings in the cross text
    `ct`, at `offset` in the text they were looked for in) that overlap nothing of `found`
    (the first pass's): (entity, value, [(slot, local start, local end), …])."""
    out: Crossing = []
    if not crossing:
        return out
    text_len = len(ct[0])
    plans, plan_start = ct[1], ct[2]
    texts, starts = slots.texts, slots.starts
    n_plans = len(plans)
    # (flat arrays: a run may hold millions of slots)
    laid: dict[int, tuple[array, array, array]] = {}

    def segments(p: int) -> tuple[array, array, array]:
        seg = laid.get(p)
        if seg is None:
            seg = laid[p] = (array("q"), array("q"), array("q"))
            _lay_out(*plans[p], plan_start[p], None, seg)
        return seg

    taken = [(f.start, f.end) for f in found]
    for f in crossing:
        f_start, f_end = f.start - offset, f.end - offset
        pa = bisect_right(plan_start, f_start) - 1
        pb = bisect_right(plan_start, f_end - 1) - 1
        if pa < 0:
            continue
        if pa == pb:
            seg_pos, seg_slot, seg_local = segments(pa)
        else:  # across a break between plans (rare): their segments in a row
            seg_pos, seg_slot, seg_local = array("q"), array("q"), array("q")
            for p in range(pa, pb + 1):
                sp, ss, sl = segments(p)
                seg_pos += sp
                seg_slot += ss
                seg_local += sl
        n_segs = len(seg_pos)
        # where the next segment starts after the last one of these plans
        after = plan_start[pb + 1] if pb + 1 < n_plans else text_len
        a = bisect_right(seg_pos, f_start) - 1
        b = bisect_right(seg_pos, f_end - 1) - 1
        if a < 0 or seg_slot[a] == seg_slot[b]:
            continue  # inside one slot: the first pass saw it
        pieces_out: list[tuple[int, int, int]] = []
        for g in range(a, b + 1):
            p0 = seg_pos[g]
            p1 = seg_pos[g + 1] if g + 1 < n_segs else after
            slot, local = seg_slot[g], seg_local[g]
            # the segment's own length (what follows it may be a break or a space)
            p1 = min(p1, p0 + len(texts[slot]) - local)
            lo, hi = max(f_start, p0) - p0, min(f_end, p1) - p0
            if hi > lo:
                pieces_out.append((slot, local + lo, local + hi))
        if len(pieces_out) < 2:
            continue
        g0 = starts[pieces_out[0][0]] + pieces_out[0][1]
        g1 = starts[pieces_out[-1][0]] + pieces_out[-1][2]
        if any(s < g1 and e > g0 for s, e in taken):
            continue  # the first pass (or the other join) has it
        taken.append((g0, g1))
        out.append((f.entity, f.value, pieces_out))
    return out


def _lay_out(idxs: list[int], run: list[str], gaps: list[bool] | None, pos: int,
             buf: list[str] | None, seg: tuple[array, array, array] | None) -> int:
    """One plan of the cross-field text, from `pos`: its pieces appended to `buf` and/or
    where each lies to `seg` (text position, slot, local start in the slot); the position
    after it. `gaps`: a space at each boundary marked (the spaced join), None: joined."""
    w = SPLIT_WINDOW
    if seg is None and buf is not None and max(map(len, run)) <= w:
        # every slot whole (short values: the usual run), laid out by C-level joins
        joined = "".join(run)
        if gaps is None:
            buf.append(joined)
            return pos + len(joined)
        buf.append(run[0])
        for t, gap in zip(run[1:], gaps, strict=True):
            if gap:
                buf.append(" ")
            buf.append(t)
        return pos + len(joined) + sum(gaps)
    last = len(idxs) - 1
    for j, i in enumerate(idxs):
        t = run[j]
        if len(t) <= w or (0 < j < last and len(t) <= 2 * w):
            pieces: tuple[tuple[int, str], ...] = ((0, t),)
        elif j == 0:
            pieces = ((len(t) - w, t[-w:]),)
        elif j == last:
            pieces = ((0, t[:w]),)
        else:
            pieces = ((0, t[:w]), (len(t) - w, t[-w:]))
        for k, (local, piece) in enumerate(pieces):
            if k:
                if buf is not None:
                    buf.append(_BREAK)
                pos += len(_BREAK)
            elif gaps is not None and j and gaps[j - 1]:
                if buf is not None:
                    buf.append(" ")
                pos += 1
            if seg is not None:
                seg[0].append(pos)
                seg[1].append(i)
                seg[2].append(local)
            if buf is not None:
                buf.append(piece)
            pos += len(piece)
    return pos


_ASCII_LETTER = re.compile(r"[A-Za-z]")
_ASCII_DIGIT = re.compile(r"[0-9]")


def _junctions(run: list[str], joined: str) -> list[bool] | None:
    """Per boundary of a run (between slot j and j + 1; `joined`: the run joined): a word
    junction there; None when the run has none. (In ASCII a junction is a letter beside a
    digit: a longer run without both, e.g. a row of numbers, has none, told by two
    C-level searches.)"""
    if len(run) > 4 and joined.isascii() and (_ASCII_LETTER.search(joined) is None
                                              or _ASCII_DIGIT.search(joined) is None):
        return None
    gaps = [_word_junction(a[-1:], b[:1]) for a, b in zip(run, run[1:], strict=False)]
    return gaps if any(gaps) else None


def _word_junction(a: str, b: str) -> bool:
    """A letter next to a digit (either way): joining them would hide a word boundary."""
    return bool(a) and a.isalnum() and b.isalnum() and a.isdigit() != b.isdigit()


def _child(path: Any, key: Any) -> Any:
    return None if path is None else (path, key)


def _setter(container: Any, key: Any) -> Callable[[str], None]:
    def set_(value: str) -> None:
        container[key] = value
    return set_


def _is_binary_field(d: dict, k: str, v: Any) -> bool:
    """A base64 payload, proven by its structure: a data URL or a payload field, with a
    long strict-base64 value (a short or non-base64 value is text and is walked)."""
    if not isinstance(v, str) or len(v) < BINARY_MIN_LEN:
        return False
    m = _DATA_URL.match(v[:256])
    if m is not None:
        return _BASE64.fullmatch(v, m.end()) is not None
    if k in BINARY_KEYS or (k == "data" and (d.get("type") == "base64" or "format" in d)):
        return _BASE64.fullmatch(v) is not None  # Anthropic base64 source, input_audio
    return False


class DuplicateKeys(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        # Parsers disagree on which duplicate wins: the upstream could read the one we
        # did not check. Refuse rather than guess.
        raise DuplicateKeys
    return d


def loads(data: str | bytes) -> Any:
    """json.loads, refusing duplicate keys and keeping the text of non-integer numbers (as
    the shared decoder does: addons/frame/decode.py)."""
    return json.loads(data, object_pairs_hook=_no_duplicates, parse_float=JsonFloat)


def _dump(obj: Any, ascii_hint: bool = False) -> str:
    """Compact JSON, non-ASCII characters written as they are (unless that is not valid
    UTF-8: lone surrogates, then every one escaped). `ascii_hint`: the text is probably
    ASCII, so the faster ASCII encoder is tried first; where it wrote no `\\u` escape at
    all, no character needed one and the result is the same text, byte for byte (both
    encoders write the same short escapes, `\\"` `\\\\` `\\n` ..., and differ only in
    which characters they write as `\\uXXXX`)."""
    if ascii_hint:
        out = json.dumps(obj, separators=(",", ":"))
        if _ESC_U_STR.search(out) is None:
            return out
    try:
        out = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        out.encode("utf-8")
        return out
    except UnicodeEncodeError:  # lone surrogates (valid JSON escapes, not valid UTF-8)
        return json.dumps(obj, separators=(",", ":"))


def _json_float(o: float) -> str:
    """A float as the json module writes it (its C encoder: float.__repr__, whatever the
    subclass, and the NaN / Infinity constants)."""
    if o != o:
        return "NaN"
    if math.isinf(o):
        return "Infinity" if o > 0 else "-Infinity"
    return float.__repr__(o)


def _orjson_default(o: Any) -> Any:
    # a JsonFloat (orjson writes only exact floats itself): the json module's spelling
    if isinstance(o, float):
        return _orjson.Fragment(_json_float(o))
    raise TypeError


def _dump_bytes(obj: Any, floats: bool, ascii_hint: Callable[[], bool] | bool = False
                ) -> bytes:
    """`_dump(obj, ascii_hint).encode()`, the same bytes, by orjson when it writes them:
    compact separators, UTF-8 with the same escapes as json's ensure_ascii=False (`\\"`
    `\\\\` `\\b` `\\t` `\\n` `\\f` `\\r`, `\\u00XX` for the other control characters,
    everything else as is), JsonFloat through `default` in json's spelling. Not when
    `floats` (a plain float was walked: orjson writes 1e-05 as 0.00001 and NaN as null),
    nor where orjson refuses (a lone surrogate, an integer past 64 bits, nesting past
    its limit, a key that is not a string): then json, as before. 10-20x faster on
    long strings (1 MB of prose: 0.1 vs 2.3 ms), and the body's ASCII checks are not
    needed (tests/masking/test_dump_bytes.py compares both on generated documents)."""
    if _orjson is not None and not floats:
        try:
            return _orjson.dumps(obj, default=_orjson_default)
        except TypeError:  # (orjson.JSONEncodeError is one)
            pass
    hint = ascii_hint() if callable(ascii_hint) else ascii_hint
    return _dump(obj, hint).encode()


_UNCHANGED: Any = object()


class Masked:
    """Masking context of one flow direction: who, which session, what was found."""

    __slots__ = ("masker", "session", "findings", "restorable", "restore", "llm", "detect",
                 "mcp", "cache", "trace", "_hint_of", "_hint", "reuse", "list_key")

    def __init__(self, masker: Masker, session: Session | None, findings: Findings, *,
                 restorable: bool = True, restore: bool = False, dialect: str = "generic",
                 detect: bool = True, cache: MessageCache | None = None) -> None:
        self.masker = masker
        self.session = session
        self.findings = findings
        self.restorable = restorable
        self.restore = restore and session is not None
        self.llm = dialect in LLM_DIALECTS
        # MCP: every SSE event is one JSON-RPC message, masked whole (addons/masking/sse.py)
        self.mcp = dialect == "mcp"
        # detect=False: a restore-only pass over a body this context already masked
        # (the masked body is what gets recorded; the restored one goes to the agent).
        self.detect = detect
        # this session's messages already masked (see MessageCache); None: no reuse
        self.cache = cache
        # when a list: every replacement made, (entity, value, replacement), in order
        self.trace: list[tuple[str, str, str]] | None = None
        # the shared parse's (generation, items reused, from generation, memo list) when
        # the JSON document given is the flow's one parse (addons/frame/decode.py parse_memo)
        self.reuse: tuple[int, int, int, str | None] | None = None
        # (a shared parse, its _message_list_key) when already asked of it in this flow
        # (addon._continues): the whole history is not checked twice (the parse is never
        # changed: copy on write)
        self.list_key: tuple[Any, str | None] | None = None
        # the JSON body being masked, until ascii_hint() is worked out from it
        self._hint_of = b""
        self._hint: bool | None = False

    def variant(self, *, restore: bool | None = None, detect: bool | None = None) -> Masked:
        """The same context (session, findings) with restore and/or detection switched."""
        out = Masked(self.masker, self.session, self.findings, restorable=self.restorable,
                     restore=self.restore if restore is None else restore,
                     detect=self.detect if detect is None else detect)
        out.llm = self.llm
        out.mcp = self.mcp
        return out

    def ascii_hint(self) -> bool:
        """The JSON body being masked is ASCII without `\\u` escapes, so its masked form is
        likely ASCII too: the fast encoder is tried first (see _dump). Worked out once,
        and only when something is re-serialised (a body with nothing found costs none)."""
        if self._hint is None:
            c = self._hint_of
            self._hint = c.isascii() and _ESC_U_BYTES.search(c) is None
            self._hint_of = b""
        return self._hint

    # -- one text
    def text(self, text: str, escape: Callable[[str], str] | None = None) -> str:
        if not self.detect:
            session = self.session
            return session.restore(text, escape) if self.restore and session else text
        return self.masker.mask_text(text, self.session, self.findings,
                                     restorable=self.restorable, restore=self.restore,
                                     escape=escape)

    # -- slots
    def _apply(self, slots: _Slots, skip: int = 0,
               detected: tuple[list, Crossing] | None = None) -> bool:
        """Mask all slots with one detector pass. True if anything changed. Findings that
        start before `skip` (a context-only first slot) are ignored. `detected`: what
        _detect gives for these slots, worked out already (_detect_units)."""
        if not slots.texts and not slots.forced:
            return False
        joined = "".join(slots.parts)
        if detected is not None:
            found, cross = detected
        else:
            found, cross = self._detect(slots, joined) if self.detect else ([], [])
        restore = self.restore and "[" in joined
        if not found and not cross and not restore and not slots.forced:
            return False
        masker, session, restorable = self.masker, self.session, self.restorable
        trace = self.trace
        texts, starts = slots.texts, slots.starts
        n = len(texts)
        ends = [s + len(t) for s, t in zip(starts, texts, strict=True)]
        # per slot: list of (local start, local end, replacement)
        edits: dict[int, list[tuple[int, int, str]]] = {}
        counts: dict[str, int] = {}
        last_end = -1
        kept_found = []
        for f in found:
            if f.start < last_end or f.start < skip:
                continue
            last_end = f.end
            kept_found.append(f)
        # every replacement in one batch, in the order they were made one by one (the
        # session's map moves the same way): found values, then the crossing ones
        repls = masker.replacements([(f.entity, f.value) for f in kept_found]
                                    + [(e, v) for e, v, _ in cross], session, restorable)
        for f, repl in zip(kept_found, repls, strict=False):
            fs, fe = f.start, f.end
            i = bisect_right(starts, fs) - 1
            if i < 0:
                i = 0
            if fs >= ends[i] and i + 1 < n:
                i += 1  # the finding starts in a separator
            entity = f.entity
            counts[entity] = counts.get(entity, 0) + 1
            if trace is not None:
                trace.append((entity, f.value, repl))
            s = starts[i]
            if fs >= s and fe <= ends[i]:  # the usual case: inside one slot
                e = edits.get(i)
                if e is None:
                    edits[i] = [(fs - s, fe - s, repl)]
                else:
                    e.append((fs - s, fe - s, repl))
                continue
            first = True  # split across slots: replacement where it starts, rest removed
            while i < n and starts[i] < fe:
                s = starts[i]
                lo, hi = max(fs, s) - s, min(fe, ends[i]) - s
                if hi > lo or first:
                    edits.setdefault(i, []).append((lo, max(lo, hi), repl if first else ""))
                    first = False
                i += 1
        for (entity, value, pieces), repl in zip(cross, repls[len(kept_found):], strict=True):
            counts[entity] = counts.get(entity, 0) + 1
            if trace is not None:
                trace.append((entity, value, repl))
            for j, (i, lo, hi) in enumerate(pieces):
                edits.setdefault(i, []).append((lo, hi, repl if j == 0 else ""))
        if cross:
            for i, e in edits.items():
                e.sort()
                kept: list[tuple[int, int, str]] = []
                for ed in e:
                    if kept and ed[0] < kept[-1][1]:
                        continue  # overlaps an earlier edit of this slot
                    kept.append(ed)
                edits[i] = kept
        for entity, k in counts.items():
            count(self.findings, entity, masker.strategy(entity), k)
        changed_owners: set[int] = set(slots.forced)
        targets = range(len(texts)) if restore else sorted(edits)
        for i in targets:
            old = texts[i]
            new = self._rebuild(old, edits.get(i, ()), restore)
            if new != old:
                slots.set(slots.setters[i], new)
                changed_owners.add(slots.owners[i])
        if not changed_owners:
            return False
        # Re-serialise changed nested documents, innermost (latest found) first.
        dirty = set(changed_owners)
        for idx in range(len(slots.subdocs) - 1, -1, -1):
            if idx in dirty:
                parent, setter, obj = slots.subdocs[idx]
                slots.set(setter, _dump(obj))
                dirty.add(parent)
        return True

    def _detect(self, slots: _Slots, joined: str) -> tuple[list, Crossing]:
        """The first pass's findings in `joined` (the slots' text) and the cross-field
        pass's crossing ones (_cross_findings): one detector call over both texts when
        the detectors name a separator that keeps them apart (isolating_break; a short
        body pays the call's fixed cost, ~5-10 us, once, not twice), else two."""
        masker = self.masker
        ct = _cross_text(masker, slots)
        if ct is None:
            return masker.find(joined), []
        brk = getattr(getattr(masker, "detectors", None), "isolating_break", None)
        sep = brk(joined) if brk is not None and USE_ONE_CALL else None
        if sep:
            cut = len(joined) + len(sep)
            both = masker.find(joined + sep + ct[0])
            n = len(joined)
            found = [f for f in both if f.end <= n]
            crossing = both[len(found):]
            # (findings come sorted; one outside both texts is not expected, but then
            # the two calls decide, never a guess)
            if not crossing or crossing[0].start >= cut:
                return found, _crossing(slots, found, crossing, ct, cut)
        found = masker.find(joined)
        return found, _crossing(slots, found, masker.find(ct[0]), ct, 0)

    def _detect_units(self, units: list[_Slots]) -> list[tuple[list, Crossing]] | None:
        """_detect of each unit (the slots of one message), from ONE detector call: each
        unit's text (its slots' text, then its cross-field text, as _detect joins them)
        after the one before, apart by DetectorSet.isolating_break of all the text before
        it, so find() over the whole is each unit's find() in turn, moved (a unit's fixed
        cost, ~10 us of prefilter scans and per-call work, is paid once for a turn's new
        messages). None where that separator is not available (custom detectors, the
        reference switch off): then each unit is its own call. A finding outside the
        unit's two texts is not expected (the separator's proof); that unit then gets
        its own _detect, never a guess."""
        brk = getattr(getattr(self.masker, "detectors", None), "isolating_break", None)
        if brk is None or not USE_ONE_CALL or len(units) < 2:
            return None
        texts: list[str] = []
        # per unit: (its start in the whole, its slots' text, where its cross text
        # starts within the unit or -1, the unit's length, its cross text)
        layout: list[tuple[int, str, int, int, CrossText | None]] = []
        pos = 0
        for slots in units:
            joined = "".join(slots.parts)
            ct = _cross_text(self.masker, slots)
            if ct is None:
                unit, cut = joined, -1
            else:
                sep = brk(joined)
                if not sep:
                    return None
                cut = len(joined) + len(sep)
                unit = joined + sep + ct[0]
            if texts:
                gap = brk("".join(texts))
                if not gap:
                    return None
                texts.append(gap)
                pos += len(gap)
            layout.append((pos, joined, cut, len(unit), ct))
            texts.append(unit)
            pos += len(unit)
        everything = self.masker.find("".join(texts))
        out: list[tuple[list, Crossing]] = []
        k, n_all = 0, len(everything)
        for slots, (start, joined, cut, size, ct) in zip(units, layout, strict=True):
            end = start + size
            if k < n_all and everything[k].start < start:
                return None  # one in a separator: cannot be (the proof); each unit alone
            mine: list = []
            while k < n_all and everything[k].start < end:
                mine.append(everything[k])
                k += 1
            n = len(joined)
            moved = [f if not start else
                     Finding(f.entity, f.start - start, f.end - start, f.value)
                     for f in mine]
            found = [f for f in moved if f.end <= n]
            crossing = moved[len(found):]
            stray = (crossing and (ct is None or crossing[0].start < cut)) or \
                any(f.end > size for f in moved)
            if stray:
                out.append(self._detect(slots, joined))
            elif ct is None:
                out.append((found, []))
            else:
                out.append((found, _crossing(slots, found, crossing, ct, cut)))
        return out

    def _rebuild(self, old: str, edits: Any, restore: bool) -> str:
        if not (restore and self.session):  # the usual case: the gaps as they are
            if not edits:
                return old
            pieces: list[str] = []
            add = pieces.append
            pos = 0
            for lo, hi, repl in edits:
                add(old[pos:lo])
                add(repl)
                pos = hi
            add(old[pos:])
            return "".join(pieces)
        if not edits:
            return self.session.restore(old) if restore and self.session else old
        out: list[str] = []
        pos = 0
        for lo, hi, repl in edits:
            gap = old[pos:lo]
            out.append(self.session.restore(gap) if restore and self.session else gap)
            out.append(repl)
            pos = hi
        gap = old[pos:]
        out.append(self.session.restore(gap) if restore and self.session else gap)
        return "".join(out)

    # -- JSON
    def json_obj(self, obj: Any) -> bool:
        """Mask a parsed JSON document in place. True if it changed."""
        slots = _Slots(self.llm, masker=self.masker)
        if isinstance(obj, dict | list):
            slots.walk(obj, -1)
        else:
            return False
        return self._apply(slots)

    def _json_doc(self, obj: Any, shared: bool) -> tuple[Any, bool]:
        """(the masked document, or _UNCHANGED; whether a plain float was walked: see
        _Slots.floats). `shared`: `obj` is the flow's one parse (read by other steps
        too): left as it is, changed parts copied."""
        slots = _Slots(self.llm, cow=shared, masker=self.masker)
        slots.walk(obj, -1)
        if not self._apply(slots):
            return _UNCHANGED, slots.floats
        return (slots.root if shared else obj), slots.floats

    def _incremental_key(self, obj: Any) -> str | None:
        if self.cache is not None and self.detect and not self.restore and self.llm and \
                isinstance(obj, dict):
            known = self.list_key
            return known[1] if known is not None and known[0] is obj else \
                _message_list_key(obj)
        return None

    def _json_incremental(self, obj: dict, key: str, shared: bool) -> bytes | None:
        """An LLM request whose history is a list of messages: each message is masked as a
        unit of its own (one detector pass, with the tail of the message before it as left
        context), and a message this session has already sent is taken from the cache,
        serialised; the rest of the document is masked around it, in document order
        (placeholders are numbered in the order values appear). A hit replays the
        message's replacements through the session first: the same calls, in the same
        order, as a miss makes, so the session's map ends up the same; only when every one
        gives the replacement cached is the cached form used (else it is masked again).
        So a hit is byte-identical to a miss, and a turn costs its new messages: they alone
        are walked, scanned and serialised; the rest is hashed and spliced."""
        cache = self.cache
        assert cache is not None
        items = list(obj.items())
        at = next(i for i, (k, _) in enumerate(items) if k == key)
        before, after = dict(items[:at]), dict(items[at + 1:])
        msgs: list = obj[key]
        # what is serialised here is the new messages and the rest of the document, not
        # the history: the fast encoder is tried on each (a miss costs a small dump),
        # rather than the whole body checked on every turn
        ascii_hint = True
        # the session map's state before anything here asks it (see _replay_prefix)
        session = self.session
        epoch = session.epoch if type(session) is Session else 0
        changed = self._apply_part(before)
        ctx_len = self.masker.context_len
        prev_tail = ""
        parts: list[bytes] = []
        # the messages the shared parse took whole from the session's previous body (the
        # very objects, after the same left context): that body's masked messages, when
        # every replacement they made is still what the session's map gives — one check
        # for the history instead of one digest per message (a digest costs a walk and a
        # hash of the message: ~4 µs per KB-sized message, O(history) per turn)
        # only when the parse's memo list is the list masked here: with both "input" and
        # "messages" in a body the memo may have continued the other one, and this list's
        # items are then not the previous body's (tests/hostile/test_fastpaths3_lists.py)
        reuse = self.reuse if shared and self.reuse is not None and \
            self.reuse[3] == key else None
        done = 0
        record: list[tuple[bytes, CachedMessage]] | None = None
        taken: CachedPrefix | None = None  # the history taken whole (record starts with it)
        if reuse is not None and reuse[0]:
            record = []
            prefix = cache.prefix(reuse[2], reuse[1], self.restorable, self.llm)
            if prefix is not None and self._replay_prefix(prefix):
                parts.extend(prefix.jsons)
                changed = changed or prefix.changed
                prev_tail = prefix.tail
                done = len(prefix.entries)
                record.extend(prefix.entries)
                taken = prefix
        new_msgs = msgs[done:] if done else msgs
        # the new messages' digests and left contexts, then the slots and findings of
        # those the cache does not hold, from one detector call (_walk_ahead); what is
        # not worked out ahead (an exception on the way: it is raised again below, at
        # the same message as before) is worked out in the loop, one message at a time
        heads: list[tuple[_Digest, str]] = []
        for msg in new_msgs:
            try:
                digest = _digest(self.restorable, prev_tail, msg)
            except Exception:  # noqa: BLE001 - any: the loop raises it at this message
                break
            prev_tail = _last_text(msg)[-ctx_len:] if ctx_len else ""
            heads.append((digest, prev_tail))
        # (looked up here, in message order, rather than each before its message is
        # masked: a message this turn sends twice after the same context is then masked
        # twice, not the second taken from the first; the same bytes either way)
        hits = [cache.get(d.key) for d, _ in heads]
        ahead = self._walk_ahead(new_msgs, heads, hits, shared) \
            if hits.count(None) > 1 else {}
        for i, msg in enumerate(new_msgs):
            if i < len(heads):
                digest, prev_tail = heads[i]
                hit = hits[i]
            else:
                digest = _digest(self.restorable, prev_tail, msg)
                prev_tail = _last_text(msg)[-ctx_len:] if ctx_len else ""
                hit = cache.get(digest.key)
            if hit is not None and self._replay(hit):
                parts.append(hit.json)
                changed = changed or hit.changed
                if record is not None:
                    record.append((digest.key, hit))
                continue
            found: Findings = {}
            one = Masked(self.masker, self.session, found, restorable=self.restorable)
            one.llm = self.llm
            one.trace = []
            got = ahead.get(i)
            if got is not None:
                slots, skip, detected = got
            else:
                slots, skip = self._message_slots(digest.context, msg, shared)
                detected = None
            one_changed = one._apply(slots, skip, detected)
            for entity, entry in found.items():
                count(self.findings, entity, entry["strategy"], entry["count"])
            # kept in the cache: an exact copy (orjson's own bytes object keeps the whole
            # buffer it grew, up to ~10x the text, as tracemalloc sees it)
            js = memoryview(_dump_bytes(
                slots.root if shared and slots.root is not None else msg, slots.floats,
                ascii_hint)).tobytes()
            changed = changed or one_changed
            entry = CachedMessage(
                js, one_changed, tuple(one.trace),
                tuple((e, v["strategy"], v["count"]) for e, v in found.items()),
                all(v["strategy"] == "placeholder" for v in found.values()))
            cache.put(digest.key, entry)
            if record is not None:
                record.append((digest.key, entry))
            parts.append(js)
        if record is not None and reuse is not None:
            # every replacement of the record was what the map gave at some point after
            # `epoch` was read (checked, or made here): while the map is still at that
            # epoch (epochs never repeat), each still is, and the next turn need not
            # check them again
            cache.set_prefix(CachedPrefix(reuse[0], tuple(record), self.restorable,
                                          self.llm, prev_tail, epoch, taken), taken)
        changed = self._apply_part(after) or changed
        if not changed:
            return None
        # the document with a unique stand-in for the list, then the list spliced in
        # (letters, digits and '-' only: it serialises as itself, on the ASCII encoder's
        # first try — a control character in it made every dump escape it and write the
        # document twice)
        mark = f"agentgate-messages-{secrets.token_hex(16)}"
        doc: dict = {}
        doc.update(before)
        doc[key] = mark
        for k, v in after.items():
            doc.setdefault(k, v)
        text = _dump(doc, ascii_hint)
        quoted = f'"{mark}"'
        head, found_mark, tail = text.partition(quoted)
        if not found_mark or quoted in tail:  # cannot happen (random); never guess
            raise Unparseable("body cannot be re-serialised", 400)
        # the messages spliced in as bytes, in one copy (each part is UTF-8 from
        # _dump_bytes; head and tail come from _dump, which returns only UTF-8-encodable
        # text, and split at ASCII: their bytes are the whole text's)
        # (one C-level join over the messages, not two appends a message in Python: the
        # history is ~80 of them at turn 40; `parts` is this call's own list)
        parts[0] = head.encode() + b"[" + parts[0]
        parts[-1] = parts[-1] + b"]" + tail.encode()
        return b",".join(parts)

    def _message_slots(self, ctx: str, msg: Any, shared: bool) -> tuple[_Slots, int]:
        """One message's slots, after its left context `ctx` (a context-only first slot:
        findings starting before the returned `skip` are not its own)."""
        slots = _Slots(self.llm, cow=shared, masker=self.masker)
        if ctx:
            slots.add(ctx, _noop, -1)
        skip = slots.pos + len(_BREAK) if ctx else 0
        slots.walk(msg, -1, 2)  # where it sits in the document (depth limit)
        return slots, skip

    def _walk_ahead(self, msgs: list, heads: list[tuple[_Digest, str]], hits: list,
                    shared: bool
                    ) -> dict[int, tuple[_Slots, int, tuple[list, Crossing] | None]]:
        """By index of `msgs`: the slots, skip and detector findings (None: _apply finds
        them) of each message the cache did not give (`hits` None; `heads`: digests and
        left contexts), found for up to BATCH_CHARS of them at a time in one detector
        call (_detect_units). Detection reads the text alone (no session, no cache), so
        working it out ahead changes nothing (a hit whose replay fails is walked in the
        loop; one walked here is not walked again: without the shared parse's copy on
        write a walk changes its message, e.g. logprobs dropped)."""
        out: dict[int, tuple[_Slots, int, tuple[list, Crossing] | None]] = {}
        group: list[tuple[int, _Slots, int]] = []
        size = 0
        for i, hit in enumerate(hits):
            if hit is not None:
                continue
            try:
                slots, skip = self._message_slots(heads[i][0].context, msgs[i], shared)
            except Exception:  # noqa: BLE001 - any: raised again where it was before
                break  # the loop walks it and raises there, after the messages before it
            if slots.pos < MIN_BATCH_CHARS:
                # short: find() may answer it at once (its quick test), alone, for nothing
                out[i] = (slots, skip, None)
                continue
            group.append((i, slots, skip))
            size += slots.pos
            if size >= BATCH_CHARS:
                self._detect_group(group, out)
                size = 0
        self._detect_group(group, out)
        return out

    def _detect_group(self, group: list[tuple[int, _Slots, int]],
                      out: dict[int, tuple[_Slots, int, tuple[list, Crossing] | None]]
                      ) -> None:
        """_walk_ahead's messages in `group` (index, slots, skip) into `out`, with their
        findings from one call when there are two or more; `group` emptied."""
        got = self._detect_units([g[1] for g in group]) if len(group) > 1 else None
        for k, (i, slots, skip) in enumerate(group):
            out[i] = (slots, skip, got[k] if got is not None else None)
        group.clear()

    def _apply_part(self, part: dict) -> bool:
        """Mask `part` (a new dict: changed in place; its values copied on write).
        A part this session sent before with nothing found in it (the model, tool
        definitions, settings: the same every turn) is not walked and scanned again: the
        detectors' answer depends on its content alone (structural digest, as a
        message's), and nothing found means no change and no call to the session."""
        if not part:
            return False
        cache = self.cache
        digest = _part_digest(self.llm, part) if cache is not None else None
        if digest is not None and cache is not None and cache.clean_part(digest):
            return False
        slots = _Slots(self.llm, cow=True, masker=self.masker)
        slots.walk(part, -1, chain=(part, _OWNED, None))
        counted = _counted(self.findings)
        changed = self._apply(slots)
        if digest is not None and cache is not None and not changed and not slots.forced \
                and _counted(self.findings) == counted:
            cache.add_clean_part(digest)
        return changed

    def _replay_prefix(self, prefix: CachedPrefix) -> bool:
        """Every replacement of the prefix's messages is what the session's map gives now,
        on its fast path (no state changes, as a per-message hit's): their findings
        counted, in message order. False: the messages are taken one by one.
        Checked value by value unless the map is still at the epoch the prefix was known
        good at (Session.epoch: nothing that could make one of them wrong happened since),
        so a turn does not cost a look-up per value of the whole history."""
        session, restorable = self.session, self.restorable
        if type(session) is not Session or not prefix.placeholders_only:
            return False
        if not (prefix.epoch and prefix.epoch == session.epoch) and \
                not session.replays(prefix.replacements(), restorable):
            return False
        for entity, strategy, n in prefix.counts:
            count(self.findings, entity, strategy, n)
        return True

    def _replay(self, hit: CachedMessage) -> bool:
        """Make a cached message's replacements again (the session's map moves as for a
        miss); True when each gives the cached replacement, with its findings counted."""
        masker, session, restorable = self.masker, self.session, self.restorable
        reps = hit.replacements
        # the usual hit: placeholders only, every value known to the session's own map
        fast = type(session) is Session and hit.placeholders_only and \
            session.replays(reps, restorable)
        if not fast:
            for entity, value, repl in reps:
                if masker.replacement(entity, value, session, restorable) != repl:
                    return False
        for entity, strategy, n in hit.counts:
            count(self.findings, entity, strategy, n)
        return True

    def json_bytes(self, content: bytes, doc: Any = None) -> bytes | None:
        """`content` masked as one JSON document. `doc`: the flow's parse of exactly these
        bytes (a dict or list, see `shared_json`), used instead of parsing them again and
        never changed (copy on write)."""
        shared = doc is not None
        if shared:
            obj = doc
        else:
            try:
                obj = loads(content)
            except DuplicateKeys:
                raise Unparseable("JSON object with duplicate keys", 400) from None
            except NumberOutOfRange:
                raise Unparseable("JSON number out of range (larger than a double)",
                                  400) from None
            except (ValueError, RecursionError):
                raise Unparseable("body is not valid JSON", 400) from None
        self._hint_of, self._hint = content, None
        if not isinstance(obj, dict | list):
            if isinstance(obj, str):
                new = self.text(obj)
                return None if new == obj else _dump(new).encode()
            if isinstance(obj, int | float) and not isinstance(obj, bool):
                # a bare number is a document too: as written and as every reader takes it
                forms = (obj.text, float.__repr__(obj)) if isinstance(obj, JsonFloat) \
                    else (str(obj),)
                for form in dict.fromkeys(forms):
                    new = self.text(form)
                    if new != form:
                        return _dump(new).encode()
            return None
        key = self._incremental_key(obj)
        if key is not None:
            return self._json_incremental(obj, key, shared)
        new_doc, floats = self._json_doc(obj, shared)
        return None if new_doc is _UNCHANGED else _dump_bytes(new_doc, floats, self.ascii_hint)

    # -- forms and query strings
    def pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
        """Mask keys and values of a form or query string. None if unchanged."""
        rows = [[k, v] for k, v in pairs]
        slots = _Slots(False, masker=self.masker)
        for row in rows:
            if row[0]:
                slots.add_string(row[0], _setter(row, 0), -1, 0)
            if row[1]:
                slots.add_string(row[1], _setter(row, 1), -1, 0)
        if not self._apply(slots):
            return None
        return [(k, v) for k, v in rows]

    def form_bytes(self, content: bytes, charset: str = "utf-8") -> bytes | None:
        try:
            text = content.decode(charset)
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                              encoding=charset, errors="strict", max_num_fields=1_000_000)
        except (UnicodeDecodeError, LookupError, ValueError):
            raise Unparseable("form body cannot be decoded", 400) from None
        new = self.pairs(pairs)
        if new is None:
            return None
        return urlencode(new, encoding=charset).encode("ascii")

    # -- headers and URL path
    def header_fields(self, fields: list[tuple[str, str]], passed: frozenset[str]
                      ) -> list[tuple[str, str]] | None:
        """Mask header names and values (one detector pass), except the headers named in
        `passed`. A name that held a value (no longer a header token) is dropped with its
        value. None if nothing changed.

        With the session's message cache (a request's headers), a set of the fields
        looked at that this session sent before with nothing found in it (an agent's SDK
        sends the same ones every turn) is not scanned again: the detectors' answer
        depends on that text alone, and nothing found means no change and no call to the
        session (kept as a digest among the session's clean parts, as the parts of a body
        around its message list)."""
        rows = [[k, v] for k, v in fields]
        slots = _Slots(False, masker=self.masker)
        for row in rows:
            if row[0].lower() in passed:
                continue
            slots.add(row[0], _setter(row, 0), -1)
            if row[1]:
                slots.add(row[1], _setter(row, 1), -1)
        cache = self.cache if self.detect and not self.restore and slots.texts else None
        digest = b""
        if cache is not None:
            # the texts in order, as the one pass reads them (repr: every string quoted
            # and escaped, so no two lists share it)
            digest = hashlib.sha256(b"headers:" + repr(slots.texts).encode(
                "utf-8", "surrogatepass")).digest()
            if cache.clean_part(digest):
                return None
        counted = _counted(self.findings)
        if not self._apply(slots):
            if cache is not None and _counted(self.findings) == counted:
                cache.add_clean_part(digest)
            return None
        return [(k, v.replace("\r", " ").replace("\n", " ")) for k, v in rows
                if _HEADER_TOKEN.fullmatch(k)]

    def url_path(self, path: str) -> str | None:
        """Mask the segments of a URL path (without its query), percent-decoded; changed
        segments are re-encoded, the others kept byte for byte. Consecutive segments are
        siblings, so '/4111/1111/1111/1111' is one card. None if nothing changed."""
        clean = getattr(self.masker, "clean_paths", None) \
            if self.detect and not self.restore and len(path) <= CLEAN_PATH_MAX else None
        if clean is not None and path in clean:
            return None  # the detectors found nothing in it before, whoever sent it
        segs = path.split("/")
        rows = [[unquote(seg, errors="surrogateescape")] for seg in segs]
        slots = _Slots(False, masker=self.masker)
        for row in rows:
            if row[0]:
                slots.add(row[0], _setter(row, 0), -1, sib=("path",))
        counted = _counted(self.findings)
        if not self._apply(slots):
            if clean is not None and _counted(self.findings) == counted:
                if len(clean) >= CLEAN_PATHS:
                    clean.clear()  # only a cache
                clean[path] = None
            return None
        out = []
        for seg, row in zip(segs, rows, strict=True):
            same = row[0] == unquote(seg, errors="surrogateescape")
            out.append(seg if same else quote(row[0], safe=_PATH_SAFE, errors="surrogateescape"))
        return "/".join(out)

    def _part_names(self, head: bytes) -> bytes | None:
        """Mask the field name and file name of a multipart part (Content-Disposition)."""
        text = head.decode("utf-8", "surrogateescape")
        found = list(_DISP_PARAM.finditer(text))
        if not found:
            return None
        rows: list[list[str]] = []
        for m in found:
            raw = m.group(4)
            if m.group(3):  # RFC 5987: charset'lang'percent-encoded
                value = unquote(raw.split("'", 2)[-1], errors="surrogateescape")
            elif raw.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", raw[1:-1])
            else:
                value = raw
            rows.append([value])
        slots = _Slots(False, masker=self.masker)
        for row in rows:
            if row[0]:
                slots.add(row[0], _setter(row, 0), -1)
        if not self._apply(slots):
            return None
        out: list[str] = []
        pos = 0
        for m, row in zip(found, rows, strict=True):
            out.append(text[pos:m.start(4)])
            new = row[0].replace("\r", " ").replace("\n", " ")
            if m.group(3):
                out.append("UTF-8''" + quote(new, safe="", errors="surrogateescape"))
            else:
                out.append('"' + new.replace("\\", "\\\\").replace('"', '\\"') + '"')
            pos = m.end(4)
        out.append(text[pos:])
        return "".join(out).encode("utf-8", "surrogateescape")

    # -- multipart
    def multipart_bytes(self, content: bytes, boundary: str, pass_text: bool) -> bytes | None:
        delim = b"--" + boundary.encode("latin-1")
        chunks = content.split(delim)
        if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
            raise Unparseable("malformed multipart body", 400)
        changed = False
        out = [chunks[0]]
        for part in chunks[1:-1]:
            if not part.startswith(b"\r\n") or not part.endswith(b"\r\n"):
                raise Unparseable("malformed multipart body", 400)
            head_end = part.find(b"\r\n\r\n")
            if head_end < 0:
                raise Unparseable("malformed multipart body", 400)
            head, body = part[:head_end + 4], part[head_end + 4:-2]
            headers = _part_headers(head)
            cte = headers.get("content-transfer-encoding", "").lower()
            if cte not in ("", "7bit", "8bit", "binary"):
                raise Unparseable(f"multipart content-transfer-encoding {cte!r}", 415)
            new = self.body(body, headers.get("content-type", "text/plain"), pass_text,
                            in_multipart=True)
            new_head = self._part_names(head)
            if new is not None or new_head is not None:
                changed = True
                part = (new_head or head) + (body if new is None else new) + b"\r\n"
            out.append(part)
        out.append(chunks[-1])
        return delim.join(out) if changed else None

    # -- any body
    def body(self, content: bytes, content_type: str, pass_text: bool = False,
             in_multipart: bool = False, doc: Any = None) -> bytes | None:
        """Masked body (decoded, identity) or None when nothing changed.
        Raises Unparseable when it cannot be masked and `pass_text` is off.
        `doc`: the flow's JSON parse of exactly `content` (`shared_json`), or None."""
        if not content:
            return None
        mime, params = parse_content_type(content_type)
        try:
            if mime == "application/json" or mime.endswith("+json") or (
                    not mime and content.lstrip()[:1] in (b"{", b"[")) or (
                    self.llm and not mime and not in_multipart):
                return self.json_bytes(content, doc)
            if mime == "application/x-www-form-urlencoded":
                return self.form_bytes(content, _text_charset(content, mime, params))
            if mime.startswith("multipart/"):
                boundary = params.get("boundary")
                if not boundary:
                    raise Unparseable("multipart body without boundary", 400)
                return self.multipart_bytes(content, boundary, pass_text)
            if mime in ("application/x-ndjson", "application/jsonl", "application/x-jsonlines"):
                return self.ndjson_bytes(content)
            if content.lstrip()[:1] in (b"{", b"["):
                # JSON under another media type: JSON-aware if it parses, text otherwise
                try:
                    return self.json_bytes(content, doc)
                except Unparseable:
                    pass
            charset = _text_charset(content, mime, params)
            try:
                text = content.decode(charset)
            except (UnicodeDecodeError, LookupError):
                raise Unparseable("body is not text in a known charset", 415) from None
            new = self.text(text)
            return None if new == text else new.encode(charset)
        except Unparseable:
            if not pass_text:
                raise
            # Explicit opt-in: mask the bytes as Latin-1 text (a lossless byte <-> char
            # mapping), so nothing is lost and anything readable is still masked.
            text = content.decode("latin-1")
            new = self.text(text)
            return None if new == text else new.encode("latin-1", "replace")

    def ndjson_bytes(self, content: bytes) -> bytes | None:
        """Every line masked, as ONE set of slots: a value split across lines (a token
        stream's `message.content`, `response` …) is caught by the cross-field pass, which
        joins the strings at the same path on consecutive lines."""
        lines = content.split(b"\n")
        slots = _Slots(self.llm, masker=self.masker)
        slots.path_mode = True
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = loads(line)
            except DuplicateKeys:
                raise Unparseable("JSON object with duplicate keys", 400) from None
            except NumberOutOfRange:
                raise Unparseable("JSON number out of range (larger than a double)",
                                  400) from None
            except (ValueError, RecursionError):
                raise Unparseable("body is not valid NDJSON", 400) from None

            def set_line(text: str, i: int = i) -> None:
                lines[i] = text.encode()
            if isinstance(obj, dict | list):
                slots.subdocs.append((-1, set_line, obj))
                slots.walk(obj, len(slots.subdocs) - 1)
            elif isinstance(obj, str) and obj:
                slots.add(obj, lambda t, f=set_line: f(_dump(t)), -1, sib=("p", "str"))
        return b"\n".join(lines) if self._apply(slots) else None


# ---------------------------------------------------------------- per-session message cache
# The lists of messages an LLM request re-sends whole every turn (OpenAI chat and Anthropic
# `messages`, OpenAI responses `input`).
MESSAGE_LISTS = ("messages", "input")


class CachedMessage(NamedTuple):
    """A message as masked once: its JSON as forwarded (masked; a message with nothing to
    mask is its own masked form), whether masking changed it, the replacements made, in
    order ((entity, original, replacement): originals the session's placeholder map holds
    anyway), and the findings counted ((entity, strategy, n))."""
    json: bytes  # UTF-8
    changed: bool
    replacements: tuple[tuple[str, str, str], ...]
    counts: tuple[tuple[str, str, int], ...]
    # every replacement is a session placeholder (the masker's strategy for its entity;
    # a cache lives no longer than its masker)
    placeholders_only: bool = False


class CachedPrefix:
    """The messages of a session's last request, as masked, under the shared parse's
    generation of that body: the next body whose parse took all of those messages from
    it (decode.parse_memo) starts with exactly them, after the same left contexts.
    What a turn that takes them whole needs is summed up once, here (their JSON, their
    findings by entity in the order counted, changed, placeholders only), so taking
    them costs no pass over every message of the history."""

    __slots__ = ("generation", "entries", "restorable", "llm", "tail", "epoch", "jsons",
                 "counts", "changed", "placeholders_only")

    def __init__(self, generation: int, entries: tuple[tuple[bytes, CachedMessage], ...],
                 restorable: bool, llm: bool, tail: str, epoch: int = 0,
                 base: CachedPrefix | None = None) -> None:
        """`base`: the prefix this turn took whole, whose entries (the very tuples) are
        the first ones of `entries`: its sums are extended, not worked out again."""
        self.generation = generation
        self.entries = entries  # (digest, entry) per message
        self.restorable = restorable
        self.llm = llm
        self.tail = tail  # the last message's left-context tail (for the next message)
        # the session map's epoch (masker.Session.epoch) at which every replacement of
        # these messages was known to be what the map gives; 0: not known (check them)
        self.epoch = epoch
        done = len(base.entries) if base is not None else 0
        if not done or len(entries) < done or entries[0] is not base.entries[0] or \
                entries[done - 1] is not base.entries[-1]:  # (not extended: summed anew)
            done = 0
        new = entries[done:] if done else entries
        # masker.count() of every message's counts in turn leaves the same findings as
        # one count() per entity of these sums, in first-counted order (an entity's
        # strategy is the masker's, the same in every message)
        sums: dict[str, list[Any]] = {}
        if done and base is not None:
            for entity, st, n in base.counts:
                sums[entity] = [st, n]
        for _, e in new:
            for entity, strategy, n in e.counts:
                got = sums.get(entity)
                if got is None:
                    sums[entity] = [strategy, n]
                else:
                    got[1] += n
        self.counts = tuple((entity, st, n) for entity, (st, n) in sums.items())
        fresh = tuple(e.json for _, e in new)
        if done and base is not None:
            self.jsons = base.jsons + fresh
            self.changed = base.changed or any(e.changed for _, e in new)
            self.placeholders_only = base.placeholders_only and all(
                e.placeholders_only for _, e in new)
        else:
            self.jsons = fresh
            self.changed = any(e.changed for _, e in new)
            self.placeholders_only = all(e.placeholders_only for _, e in new)

    def __repr__(self) -> str:  # never show values
        return f"<CachedPrefix {len(self.entries)} messages>"

    def replacements(self) -> Any:
        return chain.from_iterable(e.replacements for _, e in self.entries)


# parts of a request around its message list remembered as clean, per session (each costs
# CLEAN_PART_COST bytes of the session's cache)
CLEAN_PARTS = 8
CLEAN_PART_COST = 128


def _entry_size(e: CachedMessage) -> int:
    # a str's real size (sys.getsizeof: header plus 1, 2 or 4 bytes a character, as its widest
    # character needs), not len(): one emoji makes every character of a value 4 bytes
    return 160 + len(e.json) + sum(_sizeof(v) + _sizeof(r) for _, v, r in e.replacements)


class MessageCache:
    """The masked messages of ONE (identity, session), by digest of (left context, the
    message as sent); bounded in entries and bytes (least recently used evicted). In memory
    only; it lives and dies with its placeholder session (MessageCaches)."""

    __slots__ = ("_entries", "bytes", "max_entries", "max_bytes", "session", "masker", "_prefix",
                 "last_used", "_store", "hits", "misses", "_clean")

    def __init__(self, store: MessageCaches, session: Any, masker: Any) -> None:
        self._entries: OrderedDict[bytes, CachedMessage] = OrderedDict()
        self.bytes = 0
        self.max_entries = store.max_entries
        self.max_bytes = store.max_bytes_per_session
        self.session = session
        self.masker = masker
        self.last_used = 0.0
        self._store = store
        self.hits = 0
        self.misses = 0
        # the last request's messages (CachedPrefix): references to entries held here,
        # dropped whenever an entry is (so it never keeps an evicted one alive)
        self._prefix: CachedPrefix | None = None
        # digests of request parts around the message list in which nothing was found
        # (Masked._apply_part), least recently used first
        self._clean: OrderedDict[bytes, None] = OrderedDict()

    def __repr__(self) -> str:  # never show values
        return f"<MessageCache {len(self._entries)} messages, {self.bytes} bytes>"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes) -> CachedMessage | None:
        with self._store.lock:
            e = self._entries.get(digest)
            if e is not None:
                self._entries.move_to_end(digest)
                self.hits += 1
            else:
                self.misses += 1
            return e

    def prefix(self, generation: int, n: int, restorable: bool, llm: bool
               ) -> CachedPrefix | None:
        """The last request's messages when a parse took its `n` messages from the parse
        of `generation` (and nothing was evicted since); their entries count as used."""
        with self._store.lock:
            p = self._prefix
            if p is None or p.generation != generation or len(p.entries) != n or \
                    p.restorable != restorable or p.llm != llm:
                return None
            entries = self._entries
            for digest, _ in p.entries:
                entries.move_to_end(digest)
            self.hits += n
            return p

    def has_prefix(self, generation: int, n: int, restorable: bool, llm: bool) -> bool:
        """Would `prefix(...)` with these arguments find the last request's messages (looks
        only; what decides whether masking a continued body is small work)."""
        p = self._prefix
        return p is not None and p.generation == generation and len(p.entries) == n and \
            p.restorable == restorable and p.llm == llm

    def set_prefix(self, prefix: CachedPrefix, base: CachedPrefix | None = None) -> None:
        """`base`: the prefix this turn took whole (prefix()), whose entries are the first
        of `prefix`'s. While it is still this cache's prefix, every one of its entries is
        still held (any entry dropped or replaced drops the prefix: _drop, clear), so only
        the entries after it are looked up: a turn costs its new messages."""
        with self._store.lock:
            entries = self._entries
            ents = prefix.entries
            start = 0
            if base is not None and self._prefix is base:
                n = len(base.entries)
                if n and len(ents) >= n and ents[0] is base.entries[0] and \
                        ents[n - 1] is base.entries[-1]:
                    start = n
            # only while every message is held here (an entry over max_bytes is not)
            ok = all(entries.get(d) is e for d, e in (ents[start:] if start else ents))
            self._prefix = prefix if ok else None

    def clean_part(self, digest: bytes) -> bool:
        with self._store.lock:
            if digest not in self._clean:
                return False
            self._clean.move_to_end(digest)
            return True

    def add_clean_part(self, digest: bytes) -> None:
        store = self._store
        with store.lock:
            if digest in self._clean:
                return
            self._clean[digest] = None
            cost = CLEAN_PART_COST
            if len(self._clean) > CLEAN_PARTS:
                self._clean.popitem(last=False)
                cost = 0
            self.bytes += cost
            store.bytes += cost
            store._shrink(keep=self)

    def put(self, digest: bytes, entry: CachedMessage) -> None:
        size = _entry_size(entry)
        if size > self.max_bytes:
            return
        store = self._store
        with store.lock:
            old = self._entries.pop(digest, None)
            if old is not None:
                self._drop(old)
            self._entries[digest] = entry
            self.bytes += size
            store.bytes += size
            while self._entries and (len(self._entries) > self.max_entries
                                     or self.bytes > self.max_bytes):
                self._drop(self._entries.popitem(last=False)[1])
            store._shrink(keep=self)

    def _drop(self, e: CachedMessage) -> None:  # the store's lock held
        self._prefix = None
        size = _entry_size(e)
        self.bytes -= size
        self._store.bytes -= size

    def clear(self) -> None:  # the store's lock held
        self._prefix = None
        self._store.bytes -= self.bytes
        self.bytes = 0
        self._entries.clear()
        self._clean.clear()


class MessageCaches:
    """Every session's MessageCache, keyed like the placeholder sessions (masker.session_key:
    identity subject AND session id, so a session id sent by another identity finds
    nothing). A cache is dropped when its placeholder session is no longer the one the
    store hands out (expired or evicted) or the rules' masker changed; bounded in sessions,
    in total bytes (least recently used sessions dropped first) and by idle time."""

    def __init__(self, max_sessions: int = 10_000, idle_ttl: float = 3600.0,
                 max_entries: int = 4096, max_bytes_per_session: int = 16 << 20,
                 max_bytes: int = 256 << 20, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._caches: OrderedDict[str, MessageCache] = OrderedDict()
        self.lock = threading.Lock()
        self.max_sessions = max_sessions
        self.idle_ttl = idle_ttl
        self.max_entries = max_entries
        self.max_bytes_per_session = max_bytes_per_session
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock

    def __len__(self) -> int:
        return len(self._caches)

    def __repr__(self) -> str:
        return f"<MessageCaches {len(self._caches)} sessions, {self.bytes} bytes>"

    def get(self, key: str, session: Any, masker: Any) -> MessageCache:
        now = self._clock()
        with self.lock:
            while self._caches:  # idle ones, oldest first
                k, c = next(iter(self._caches.items()))
                if now - c.last_used <= self.idle_ttl:
                    break
                c.clear()
                del self._caches[k]
            c = self._caches.get(key)
            if c is not None and (c.session is not session or c.masker is not masker):
                c.clear()
                del self._caches[key]
                c = None
            if c is None:
                c = self._caches[key] = MessageCache(self, session, masker)
                while len(self._caches) > self.max_sessions:
                    self._caches.popitem(last=False)[1].clear()
            else:
                self._caches.move_to_end(key)
            c.last_used = now
            return c

    def _shrink(self, keep: MessageCache) -> None:  # the lock held
        while self.bytes > self.max_bytes and self._caches:
            k, c = next(iter(self._caches.items()))
            if c is keep:
                if len(self._caches) == 1:
                    break
                self._caches.move_to_end(k)
                continue
            c.clear()
            del self._caches[k]

    def clear(self) -> None:
        with self.lock:
            for c in self._caches.values():
                c.clear()
            self._caches.clear()


def _message_list_key(obj: dict) -> str | None:
    """The key of the request's message list when every item is a message object (not a
    bare string or a `{"text": …}` part, whose neighbours the whole-body walk joins)."""
    for key in MESSAGE_LISTS:
        v = obj.get(key)
        if isinstance(v, list) and v and _all_messages(v):
            return key
    return None


def _all_messages(items: list) -> bool:
    """Is every item a dict without a string "text"? Asked of the whole history every turn
    (twice): for the usual list of plain dicts the item types and "text" types are
    collected at C speed (map), ~4x faster than a generator; anything else (a dict
    subclass, a non-dict) is answered item by item as before."""
    if set(map(type, items)) == {dict}:
        texts = set(map(type, map(dict.get, items, repeat("text"))))
        return not any(issubclass(t, str) for t in texts)
    return all(isinstance(m, dict) and not isinstance(m.get("text"), str) for m in items)


class _Digest(NamedTuple):
    key: bytes
    context: str  # the left context (original text; never stored, only hashed)


def _digest(restorable: bool, context: str, msg: Any) -> _Digest:
    """The cache key of a message: its left context and its content, hashed structurally
    (type-tagged, length-prefixed, so no two documents share a feed), no serialisation."""
    h = hashlib.sha256(b"r" if restorable else b"n")
    _feed(h, context, 0)
    _feed(h, msg, 0)
    return _Digest(h.digest(), context)


def _part_digest(llm: bool, part: dict) -> bytes | None:
    """The digest of a request part around the message list (None: too deep to hash
    here; the walk then refuses it as it always did)."""
    h = hashlib.sha256(b"part:llm" if llm else b"part")
    try:
        _feed(h, part, 0)
    except RecursionError:
        return None
    return h.digest()


def _feed(h: Any, node: Any, depth: int) -> None:
    t = type(node)
    if t is str:
        b = node.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(b))
        h.update(b)
    elif t is dict:
        h.update(b"d%d:" % len(node))
        for k, v in node.items():
            _feed(h, k, depth + 1)
            _feed(h, v, depth + 1)
    elif t is list:
        h.update(b"l%d:" % len(node))
        for v in node:
            _feed(h, v, depth + 1)
    elif node is None or t is bool:
        h.update(b"c" + repr(node).encode())
    elif t is JsonFloat:
        h.update(b"f" + node.text.encode() + b";")
    else:  # int (JSON has no other types after `loads`)
        h.update(b"i" + str(node).encode() + b";")


def _last_text(node: Any, depth: int = 0) -> str:
    """The last string of a message (depth first): the left context of the next one."""
    if isinstance(node, str):
        return node
    if depth > 16:
        return ""
    vals = list(node.values()) if isinstance(node, dict) else \
        node if isinstance(node, list) else ()
    for v in reversed(vals):
        t = _last_text(v, depth + 1)
        if t:
            return t
    return ""


def _noop(_: str) -> None:
    return None


def _part_headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def json_escape(value: str) -> str:
    """A value as it must appear inside a JSON string literal (for streamed arguments)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]

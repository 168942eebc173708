"""Policy evaluation: request facts -> one decision. Pure logic, no mitmproxy import.

Rules are compiled once when the rules are loaded (addons/policy/config.py builds the
objects below): regular expressions, globs and a single combined prompt pattern per rule
are ready before the first request. Per request, the facts are computed lazily and at
most once: the JSON body is parsed only if some rule reaches a condition that needs it,
the prompt text is extracted only if a rule reaches a `prompt` condition, and so on.

Evaluation order (documented in rules/README.md):
  1. Rules are tried in file-name order, then list order within a file.
  2. Within a rule, every condition must hold (cheap conditions are tried first; the
     order never changes the result).
  3. A matching rule in observe mode (`action: observe`, or `observe: true` on any rule)
     is recorded as an observation and evaluation goes on: observing never changes what
     is enforced.
  4. The first matching allow / block / approve rule decides and evaluation stops.
  5. No deciding rule: allow, named `<default>` (egress is already default-deny at the
     upstreams). If observe rules matched, the decision is the first observation.
  6. Global observe-only mode turns a block / approve decision into an observed one: it
     is recorded, and the flow passes.
"""

from __future__ import annotations

import bisect
import datetime
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from addons.frame.batch import batch_requests, dumps_body, multipart_parts
from addons.frame.decode import Body, DecodeError, is_json_mime, parse_content_type
from addons.mcp.jsonrpc import JsonRpcError, Message, parse_message
from addons.policy.skeleton import normalize, skeleton

ACTIONS = ("allow", "block", "approve", "observe")
DEFAULT_RULE = "<default>"
DEFAULT_BLOCK_MESSAGE = "request blocked by policy"


class BodyUnavailable(Exception):
    """A rule needs the request body, but it cannot be read (bad encoding, streamed), or
    a fact a rule tests is not what it must be (a non-number where a number is compared,
    two different models): the request is refused, never guessed at."""


# ---------------------------------------------------------------- request facts
_UNSET: Any = object()

# where the model is named in the URL path: Azure OpenAI deployments, Gemini models
_PATH_MODEL = re.compile(r"/(?:openai/)?deployments/([^/]+)(?:/|$)|/models/([^/:]+):")
# every spelling of "how many tokens may the answer have", per dialect
OUTPUT_TOKEN_KEYS: tuple[tuple[str, ...], ...] = (
    ("max_tokens",), ("max_completion_tokens",), ("max_output_tokens",),
    ("max_tokens_to_sample",), ("generationConfig", "maxOutputTokens"),
    ("generation_config", "max_output_tokens"), ("options", "num_predict"),
    ("parameters", "max_new_tokens"),
)
# request keys that give the model a provider-side tool without a `tools` entry
_OPTION_TOOLS = {"web_search_options": "web_search"}


class RequestFacts:
    """What rules can look at, computed on first use and then cached.

    `body` is the request body: bytes, None for no body, a decoded `Body`
    (addons/frame/decode.py), or a callable returning one of those (so an addon can defer
    decoding until a rule needs it). `json_loader`, if given, returns the parsed JSON body
    (None when not JSON). `content_type` is used when `body` is bytes.
    """

    def __init__(self, method: str = "GET", host: str = "", path: str = "/", *,
                 upstream: str | None = None, identity: dict[str, Any] | None = None,
                 body: Any = None,
                 json_loader: Callable[[], Any] | None = None,
                 now: float | None = None, content_type: str = "",
                 batch: bool = True, dialect: str | None = None) -> None:
        self.method = method.upper()
        self.dialect = dialect
        self.host = host.lower().rstrip(".")
        self.path = normalize_path(path)
        self.query = path.split("?", 1)[1].split("#", 1)[0] if "?" in path else ""
        self.upstream = upstream
        self.identity = identity
        ident = identity if isinstance(identity, dict) else {}
        self.authenticated = bool(ident.get("sub"))
        self.sub = str(ident.get("sub") or "")
        self.iss = str(ident.get("iss") or "")
        self.groups = frozenset(str(g) for g in (ident.get("groups") or ()))
        self.roles = frozenset(str(r) for r in (ident.get("roles") or ()))
        if now is None:
            import time
            now = time.time()
        self.now = now
        self.content_type = content_type
        self.batch_enabled = batch
        self._body_src = body
        self._json_loader = json_loader
        self._decoded: Any = _UNSET
        self._json: Any = _UNSET
        self._prompt: str | None = None
        self._norm: str | None = None
        self._skel: str | None = None
        self._folded: dict[str, str] = {}
        self._tools: frozenset[str] | None = None
        self._ptools: tuple[ProviderTool, ...] | None = None
        self._model: Any = _UNSET
        self._mcp: Any = _UNSET
        self._local: dict[str, datetime.datetime] = {}
        # the session's SearchHistory (set by the policy addon): prompt searches start
        # where this text differs from what the session sent before
        self.history: SearchHistory | None = None
        # per text form: (the session's previous text's generation, the prefix length
        # both share, this text's generation): SearchHistory.begin, once per request
        self._shared: dict[str, tuple[int, int, int]] = {}
        # while the prompt text is built from a session's history (_item_strings): per
        # message list (key, index of its first part, items, ends, budget used), with the
        # session's last prompt text that spans refer to
        self._lists: tuple[str, list[tuple[Any, ...]]] | None = None

    # -- body
    @property
    def decoded(self) -> Body:
        if self._decoded is _UNSET:
            src = self._body_src
            try:
                value = src() if callable(src) else src
            except BodyUnavailable:
                raise
            except DecodeError as e:
                raise BodyUnavailable(f"cannot decode the request body: {e.reason}") \
                    from None
            except Exception as e:  # noqa: BLE001 - e.g. ValueError on a bad content-encoding
                raise BodyUnavailable(f"cannot decode the request body ({type(e).__name__})") \
                    from None
            if not isinstance(value, Body):
                mime, params = parse_content_type(self.content_type)
                value = Body(value or b"", mime, params)
            self._decoded = value
        return self._decoded

    @property
    def body(self) -> bytes:
        return self.decoded.data

    @property
    def body_size(self) -> int:
        return len(self.body)

    @property
    def json(self) -> Any:
        """The parsed JSON body, or None when the body is empty or not JSON."""
        if self._json is _UNSET:
            try:
                if self._json_loader is not None:
                    self._json = self._json_loader()
                else:
                    self._json = self.decoded.json
            except BodyUnavailable:
                raise
            except DecodeError as e:
                raise BodyUnavailable(f"cannot read the request body: {e.reason}") from None
            except Exception as e:  # noqa: BLE001 - decoding failed
                raise BodyUnavailable(
                    f"cannot decode the request body ({type(e).__name__})") from None
        return self._json

    @property
    def model(self) -> str | None:
        """The model: named in the URL path (Azure deployments, Gemini) or the body. Both,
        and different: refused (the provider uses one, a rule may have judged the other)."""
        if self._model is _UNSET:
            m = _PATH_MODEL.search(self.path)
            in_path = (m.group(1) or m.group(2)) if m else None
            j = self.json
            b = j.get("model") if isinstance(j, dict) else None
            if b is not None and not isinstance(b, str):
                raise BodyUnavailable("the model field is not a string")
            if in_path and b and in_path.lower() != b.lower():
                raise BodyUnavailable("the URL path and the body name different models")
            self._model = in_path or b
        return self._model

    @property
    def mcp(self) -> Message | None:
        """The JSON-RPC message of a request to an `mcp` upstream (None for a batch, whose
        messages are judged one by one through `batch()`, and for other upstreams)."""
        if self._mcp is _UNSET:
            j = self.json if self.dialect == "mcp" else None
            try:
                self._mcp = parse_message(j) if isinstance(j, dict) else None
            except JsonRpcError as e:
                raise BodyUnavailable(f"not a valid JSON-RPC message: {e.message}") from None
        return self._mcp

    @property
    def output_tokens(self) -> list[Any]:
        """Every value the request gives for its output-token limit, in any dialect's
        spelling (the largest one decides a comparison; see `tokens_test`)."""
        j = self.json
        if not isinstance(j, dict):
            return []
        out: list[Any] = []
        for path in OUTPUT_TOKEN_KEYS:
            node: Any = j
            for seg in path:
                node = node.get(seg, _UNSET) if isinstance(node, dict) else _UNSET
            if node is not _UNSET and node is not None:
                out.append(node)
        return out

    @property
    def prompt_text(self) -> str:
        """What keyword rules search: every string of the body (values and keys, JSON
        inside strings too); a form body's decoded names and values; a multipart body's
        field names, file names and parts (each read as its own body); other text as is,
        plus the strings of every line that is JSON (JSONL / NDJSON); and the decoded
        query string. A body that is not text in its charset is refused."""
        if self._prompt is None:
            out: list[str] = []
            budget = [max(STRING_BUDGET_FACTOR * len(self.body), MIN_STRING_BUDGET)]
            try:
                self._body_strings(self.decoded, out, budget, top=True)
            except DecodeError as e:
                raise BodyUnavailable(f"cannot read the request body as text: "
                                      f"{e.reason}") from None
            if self.query:
                for k, v in parse_qsl(self.query, keep_blank_values=True):
                    out.append(k)
                    all_strings(v, out, budget=budget)
            if self._lists is not None:
                self._prompt = self._join_parts(out)
            else:
                self._prompt = "\n\n".join(out)
        return self._prompt

    def _body_strings(self, body: Body, out: list[str], budget: list[int], *,
                      top: bool = False) -> None:
        j = self.json if top else body.json
        if j is not None:
            if top and self._incremental():
                self._item_strings(j, out, budget)
            else:
                all_strings(j, out, budget=budget)
            return
        if not body.data:
            return
        mime = body.mime
        if mime == "application/x-www-form-urlencoded":
            for k, v in parse_qsl(body.text, keep_blank_values=True):
                out.append(k)
                all_strings(v, out, budget=budget)
            return
        if mime.startswith("multipart/"):
            for part in multipart_parts(body.data, body.params.get("boundary", "")):
                out.extend(x for x in (part.name, part.filename) if x)
                pm, pp = parse_content_type(part.content_type)
                sub = Body(part.data, pm, pp)
                try:
                    self._body_strings(sub, out, budget)
                except DecodeError:
                    if pm.startswith("text/") or is_json_mime(pm):
                        raise
                    # a binary file (image, audio): its bytes as Latin-1 still show any
                    # ASCII text hidden in it
                    out.append(part.data.decode("latin-1"))
            return
        text = body.text
        out.append(text)
        if "{" in text or "[" in text:  # JSON lines: escapes must not hide words
            for line in text.splitlines():
                if line.lstrip()[:1] in ("{", "[") and budget[0] > len(line):
                    budget[0] -= len(line)
                    try:
                        all_strings(json.loads(line), out, budget=budget)
                    except (ValueError, RecursionError):
                        continue

    def _incremental(self) -> bool:
        """Is this request's work continued from its session's last one? (A history, a
        body worth it.)"""
        return self.history is not None and len(self.body) >= INCREMENTAL_MIN_CHARS

    def _item_strings(self, j: Any, out: list[Any], budget: list[int]) -> None:
        """all_strings(j, out, budget=budget), except that the strings of the first items
        of a message list that are the very items the session's last request had are not
        walked again: they are one (start, end) span of that request's prompt text in
        `out` (_join_parts makes the text). The text comes out exactly as all_strings
        makes it: the strings of a list's items are consecutive in it, in order, joined
        by the same separator."""
        if type(j) is not dict:
            all_strings(j, out, budget=budget)
            return
        h = self.history
        assert h is not None
        lists: list[tuple[Any, ...]] = []
        # the session's last prompt text: the one spans in `out` refer to (read once: a
        # concurrent request of the session may record another meanwhile)
        last = h.last("prompt_text")
        out.extend(j)  # the keys first, then the values: all_strings' order
        for key, v in j.items():
            tv = type(v)
            if tv is str:
                _string(v, out, 0, budget)
            elif tv is list and key in _ITEM_LISTS:
                lists.append(self._list_strings(key, v, out, budget, last))
            elif tv is dict or tv is list:
                all_strings(v, out, 1, budget)
        self._lists = (last[1] if last is not None else "", lists)

    def _list_strings(self, key: str, items: list[Any], out: list[Any], budget: list[int],
                      last: tuple[int, str, Any] | None) -> tuple[Any, ...]:
        """all_strings(items, out, 1, budget) for one message list (see _item_strings)."""
        h = self.history
        assert h is not None
        rec = h.record(("text", key))
        m = 0
        end, used = -1, 0
        first = len(out)
        if rec is not None and last is not None and last[0] == rec.gen:
            m = self._known_items(key, rec.memo, len(rec.ends))
        if m:
            # walking them would raise exactly when the budget left is below what they took
            used = rec.used[m - 1]
            if budget[0] < used:
                raise BodyUnavailable("too much JSON nested in strings to inspect")
            budget[0] -= used
            end = rec.ends[m - 1]
            if end >= 0:
                out.append((rec.start, rec.start + end))
        ends = list(rec.ends[:m]) if m else []
        useds = list(rec.used[:m]) if m else []
        for item in items[m:]:
            sub: list[str] = []
            before = budget[0]
            ti = type(item)
            if ti is str:
                _string(item, sub, 1, budget)
            elif ti is dict or ti is list:
                all_strings(item, sub, 2, budget)
            if sub:
                chunk = "\n\n".join(sub)
                out.append(chunk)
                end = (end + 2 if end >= 0 else 0) + len(chunk)
            used += before - budget[0]
            ends.append(end)
            useds.append(used)
        return key, first if len(out) > first else -1, ends, useds

    def _known_items(self, key: str, memo: int, known: int) -> int:
        """How many first items of the `key` list are the very objects of the parse with
        memo generation `memo` (the session's last request's), of which `known` were
        recorded (decode.Body.reused / reused_from; 0 when the memo did not continue)."""
        body = self.decoded
        if not memo or body.reused_from != memo or body.memo_list != key:
            return 0
        return min(body.reused, known)

    def _join_parts(self, out: list[Any]) -> str:
        """The prompt text from `out` (strings, and spans of the session's last prompt
        text); where each message list's strings begin in it goes to the history."""
        h = self.history
        assert h is not None and self._lists is not None
        (old_text, lists), self._lists = self._lists, None
        starts = {first: None for _, first, _, _ in lists if first >= 0}
        parts: list[str] = []
        pos = 0
        for i, p in enumerate(out):
            if type(p) is tuple:
                p = old_text[p[0]:p[1]]
            if i in starts:
                starts[i] = pos
            pos += len(p) + 2
            parts.append(p)
        text = "\n\n".join(parts)
        shared = self._shared["prompt_text"] = h.begin("prompt_text", text)
        memo = self.decoded.generation
        for key, first, ends, useds in lists:
            start = starts[first] if first >= 0 else 0
            h.set_record(("text", key), ListText(tuple(ends), tuple(useds), memo,
                                                 shared[2], start or 0))
        return text

    @property
    def norm_text(self) -> str:
        """The prompt text normalised (NFKC, invisibles and marks out, hyphenation joined)."""
        if self._norm is None:
            self._norm = self._derived("norm_text", normalize)
        return self._norm

    @property
    def skel_text(self) -> str:
        """The prompt text's skeleton: normalised, case folded, confusables mapped."""
        if self._skel is None:
            self._skel = self._derived("skel_text", skeleton)
        return self._skel

    def _derived(self, which: str, fn: Callable[[str], str]) -> str:
        text = self.prompt_text
        h = self.history
        if h is None or len(text) < INCREMENTAL_MIN_CHARS:
            return fn(text)
        out, self._shared[which] = h.derive(which, fn, text, self._begun("prompt_text"))
        return out

    def _begun(self, which: str) -> tuple[int, int, int]:
        shared = self._shared.get(which)
        if shared is None:
            h = self.history
            assert h is not None
            shared = self._shared[which] = h.begin(which, getattr(self, which))
        return shared

    def folded(self, which: str) -> str:
        """A text case-folded exactly as `re.IGNORECASE` compares characters."""
        f = self._folded.get(which)
        if f is None:
            text = getattr(self, which)
            # the ASCII skeleton is lower case already: folding it again changes nothing
            f = text if which == "skel_text" and text.isascii() else fold(text)
            self._folded[which] = f
        return f

    @property
    def prompt_folded(self) -> str:
        return self.folded("prompt_text")

    def search(self, pattern: re.Pattern[str], which: str,
               fast: re.Pattern[str] | None = None,
               whole: re.Pattern[str] | None = None) -> bool:
        """Does `pattern` match one form of the prompt text (`prompt_text`, `norm_text`,
        `skel_text`)? With a session history, only the part that can hold a match the
        session's previous text did not have is searched (SearchHistory.search). `fast`
        is `search_twin(pattern)`: the same matches, found sooner; `whole` is
        `anchor_twin(pattern)`: a match somewhere exactly when `pattern` has one, for a
        search of the whole text and the session's incremental search."""
        text = getattr(self, which)
        h = self.history
        if h is None or len(text) < INCREMENTAL_MIN_CHARS:
            return (whole or fast or pattern).search(text) is not None
        # the anchor serves the incremental search too (SearchHistory.search: a match it
        # finds from `start` is one of the pattern's from there; see anchor_twin)
        return h.search(pattern, which, text, self._begun(which), whole or fast)

    def has_literal(self, lits: Iterable[str], which: str) -> bool:
        """Is one of `lits` (case folded) in the case-folded `which` text? With a session
        history, only in what is new since the session's last text (SearchHistory.contains:
        the same answer)."""
        text = getattr(self, which)
        h = self.history
        if h is None or len(text) < INCREMENTAL_MIN_CHARS:
            folded = self.folded(which)
            return any(lit in folded for lit in lits)

        def folded_from(start: int) -> str:
            f = self._folded.get(which)
            if f is not None:
                return f[start:]
            t = text[start:]
            return t if which == "skel_text" and t.isascii() else fold(t)

        return h.contains(lits, which, text, self._begun(which), folded_from)

    @property
    def tool_names(self) -> frozenset[str]:
        if self._tools is None:
            j = self.json
            if not isinstance(j, dict):
                self._tools = frozenset()
            elif self._incremental():
                self._tools = self._session_tool_names(j)
            else:
                self._tools = frozenset(tool_names(j))
        return self._tools

    def _session_tool_names(self, j: dict[str, Any]) -> frozenset[str]:
        """tool_names(j), the names in the first items of a message list that are the
        very items the session's last request had taken from what it found in them."""
        h = self.history
        assert h is not None
        names = tool_names({k: v for k, v in j.items() if k not in _ITEM_LISTS})
        for key in ("messages", "input"):
            items = j.get(key)
            if not isinstance(items, list):
                continue
            rec = h.record(("tools", key))
            m = self._known_items(key, rec.memo, len(rec.tools)) if rec is not None else 0
            acc = rec.tools[m - 1] if m else frozenset()
            cum = list(rec.tools[:m]) if m else []
            for item in items[m:]:
                if isinstance(item, dict):
                    found: set[str] = set()
                    _item_tool_names(item, found)
                    if found - acc:
                        acc = acc | found
                cum.append(acc)
            names |= acc
            h.set_record(("tools", key), ListTools(tuple(cum), self.decoded.generation))
        return frozenset(names)

    @property
    def provider_tools(self) -> tuple[ProviderTool, ...]:
        """Every provider-side tool the request enables (see `provider_tools`)."""
        if self._ptools is None:
            j = self.json
            self._ptools = tuple(provider_tools(j)) if isinstance(j, dict) else ()
        return self._ptools

    def local_time(self, tz: datetime.tzinfo, key: str) -> datetime.datetime:
        t = self._local.get(key)
        if t is None:
            t = self._local[key] = datetime.datetime.fromtimestamp(self.now, tz)
        return t

    def batch(self) -> list[RequestFacts]:
        """Facts of every request this one carries (batch uploads, inline batches)."""
        if not self.batch_enabled or self.method != "POST":
            return []
        if self.dialect == "mcp":
            return self._mcp_batch()
        p = self.path.rstrip("/")
        if p.endswith("/uploads"):
            # OpenAI's Uploads API sends a file in parts: a batch file's lines would be
            # split across requests and never be read whole, so a batch goes by /files
            j = self.json
            purpose = j.get("purpose") if isinstance(j, dict) else None
            if isinstance(purpose, str) and purpose.strip().lower() == "batch":
                raise BodyUnavailable("a batch file uploaded in parts cannot be inspected "
                                      "line by line; upload it with /v1/files")
            return []
        if not p.endswith(("/files", "/batches")):
            return []
        try:
            reqs = batch_requests(self.method, self.path, self.decoded)
        except DecodeError as e:
            raise BodyUnavailable(f"cannot read the batch: {e.reason}") from None
        out: list[RequestFacts] = []
        for r in reqs or ():
            f = RequestFacts(r.method, self.host, r.url, upstream=self.upstream,
                             identity=self.identity, body=dumps_body(r.body),
                             json_loader=(lambda b=r.body: b), now=self.now,
                             content_type="application/json", batch=False)
            f.label = r.label
            out.append(f)
        return out

    def _mcp_batch(self) -> list[RequestFacts]:
        """A JSON-RPC batch: every message judged on its own (strictest wins)."""
        j = self.json
        if not isinstance(j, list):
            return []
        out: list[RequestFacts] = []
        for i, item in enumerate(j):
            f = RequestFacts(self.method, self.host, self.path, upstream=self.upstream,
                             identity=self.identity, body=dumps_body(item),
                             json_loader=(lambda b=item: b), now=self.now,
                             content_type="application/json", batch=False, dialect="mcp")
            method = item.get("method") if isinstance(item, dict) else None
            f.label = f"batch message {i}" + (f" ({method})" if isinstance(method, str)
                                             else "")
            out.append(f)
        return out

    label = ""


def normalize_path(path: str) -> str:
    """The URL path as a server resolves it, so rules cannot be dodged by spelling:
    no query or fragment, percent-decoded, repeated slashes collapsed, `.` and `..`
    segments removed (`/v1/./chat//%63ompletions` -> `/v1/chat/completions`)."""
    from urllib.parse import unquote
    p = unquote(path.split("?", 1)[0].split("#", 1)[0], errors="replace")
    if "//" not in p and "/." not in p:
        return p if p.startswith("/") else "/" + p
    out: list[str] = []
    segs = p.split("/")
    for seg in segs:
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    trailing = "/" if segs[-1] in ("", ".", "..") and out else ""
    return "/" + "/".join(out) + trailing


# ---------------------------------------------------------------- text and tool extraction
def prompt_texts(body: Any) -> list[str]:
    """Every text part of an LLM request, system prompts included.

    Understands OpenAI chat completions (`messages`, string or content-part lists, tool
    call arguments), OpenAI responses (`instructions`, `input` as string or items, function
    call outputs), Anthropic messages (`system` string or blocks, content blocks, tool_use
    input, tool_result content) and legacy completions / embeddings (`prompt`, `input`).
    Any other JSON yields all its string values, so a webhook payload is searchable too.
    """
    out: list[str] = []
    if not isinstance(body, dict):
        _all_strings(body, out)
        return out
    known = False
    for key in ("system", "instructions"):
        if key in body:
            known = True
            _content(body[key], out)
    msgs = body.get("messages")
    if isinstance(msgs, list):
        known = True
        for m in msgs:
            _item(m, out)
    for key in ("input", "prompt"):
        if key in body:
            known = True
            v = body[key]
            if isinstance(v, list):
                for item in v:
                    _item(item, out)
            else:
                _content(v, out)
    if not known:
        _all_strings(body, out)
    return out


def all_strings(node: Any, out: list[str], depth: int = 0,
                budget: list[int] | None = None) -> None:
    """Every string of a JSON value, object keys included; a string that itself holds
    JSON (tool-call arguments, a JSON schema passed as text) is also searched as that
    JSON, so `\\u0070assword` escapes cannot hide a word. `budget` bounds the total size
    of the JSON-in-strings parsed. (Hot path: type checks by identity, leaves inline.)"""
    if budget is None:
        budget = [1 << 20]
    t = type(node)
    if t is str:
        out.append(node)
        _nested(node, out, depth, budget)
        return
    if depth > MAX_DEPTH:
        # deeper than we search: a word hidden there would pass unseen
        raise BodyUnavailable(f"JSON nested deeper than {MAX_DEPTH} levels")
    if t is dict:
        out.extend(node)
        values: Any = node.values()
    elif t is list:
        values = node
    else:
        return
    append = out.append
    for v in values:
        tv = type(v)
        if tv is str:
            append(v)
            if v and (v[0] in _NESTED_START or v[0].isspace()):
                _nested(v, out, depth, budget)
        elif tv is dict or tv is list:
            all_strings(v, out, depth + 1, budget)


_NESTED_START = frozenset('{["')
# JSON nested in strings parsed per request: this many times the body, at least the minimum
STRING_BUDGET_FACTOR = 8
MIN_STRING_BUDGET = 1 << 16
# the lists whose items a session's history knows (the parse memo's, addons/frame/decode.py)
_ITEM_LISTS = frozenset(("messages", "input"))
MAX_DEPTH = 64


def _string(s: str, out: list[Any], depth: int, budget: list[int]) -> None:
    """A string value as all_strings takes it: itself, then the JSON it may hold."""
    out.append(s)
    if s and (s[0] in _NESTED_START or s[0].isspace()):
        _nested(s, out, depth, budget)


def _nested(s: str, out: list[str], depth: int, budget: list[int]) -> None:
    head = s.lstrip()[:1]
    if head not in _NESTED_START or len(s) < 2:
        return
    if budget[0] < len(s):
        raise BodyUnavailable("too much JSON nested in strings to inspect")
    budget[0] -= len(s)
    try:
        inner = json.loads(s)
    except (ValueError, RecursionError):
        return
    if type(inner) is str:
        if inner != s:
            out.append(inner)
            _nested(inner, out, depth + 1, budget)
    else:
        all_strings(inner, out, depth + 1, budget)


def _all_strings(node: Any, out: list[str], depth: int = 0) -> None:
    if depth > 64:
        return
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, dict):
        for v in node.values():
            _all_strings(v, out, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _all_strings(v, out, depth + 1)


def _item(item: Any, out: list[str]) -> None:
    """A chat message, an Anthropic message or a responses `input` item."""
    if not isinstance(item, dict):
        _content(item, out)
        return
    if "content" in item:
        _content(item["content"], out)
    _part(item, out, skip_content=True)
    for call in item.get("tool_calls") or ():
        if isinstance(call, dict):
            fn = call.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                out.append(fn["arguments"])
    fc = item.get("function_call")
    if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
        out.append(fc["arguments"])


def _content(content: Any, out: list[str], depth: int = 0) -> None:
    """A string, a list of content parts / blocks, or one part."""
    if depth > 16:
        return
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                _part(part, out, depth=depth + 1)
    elif isinstance(content, dict):
        _part(content, out, depth=depth + 1)


def _part(part: dict[str, Any], out: list[str], *, skip_content: bool = False,
          depth: int = 0) -> None:
    t = part.get("type")
    for key in ("text", "refusal", "thinking"):
        if isinstance(part.get(key), str):
            out.append(part[key])
    if t in ("tool_use", "server_tool_use", "mcp_tool_use"):
        _all_strings(part.get("input"), out)
    elif t in ("function_call", "custom_tool_call", "mcp_call"):
        for key in ("arguments", "input"):
            if isinstance(part.get(key), str):
                out.append(part[key])
    elif t in ("function_call_output", "custom_tool_call_output"):
        _content(part.get("output"), out, depth + 1)
    elif t == "document":
        src = part.get("source")
        if isinstance(src, dict):
            if isinstance(src.get("data"), str) and src.get("type") == "text":
                out.append(src["data"])
            if "content" in src:
                _content(src["content"], out, depth + 1)
    if t == "reasoning":
        _content(part.get("summary"), out, depth + 1)
    if not skip_content and isinstance(t, str) and t.endswith("tool_result"):
        _content(part.get("content"), out, depth + 1)


def tool_names(body: dict[str, Any],
               of_item: Callable[[dict[str, Any]], Iterable[str]] | None = None
               ) -> set[str]:
    """Names of tools defined in the request and tools called in its history. `of_item`:
    the names in one history item, when known (else _item_tool_names)."""
    names: set[str] = set()

    def add(v: Any) -> None:
        if isinstance(v, str) and v:
            names.add(v)

    for t in body.get("tools") or ():
        if not isinstance(t, dict):
            continue
        fn = t.get("function")
        if isinstance(fn, dict):
            add(fn.get("name"))
        elif isinstance(t.get("name"), str):
            add(t["name"])
        else:
            add(t.get("type"))  # built-in tools: web_search_preview, code_interpreter, …
    for f in body.get("functions") or ():
        if isinstance(f, dict):
            add(f.get("name"))
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function")
        add(fn.get("name") if isinstance(fn, dict) else choice.get("name"))
    fc = body.get("function_call")
    if isinstance(fc, dict):
        add(fc.get("name"))
    for key in ("messages", "input"):
        v = body.get(key)
        if isinstance(v, list):
            for m in v:
                if not isinstance(m, dict):
                    continue
                if of_item is None:
                    _item_tool_names(m, names)
                else:
                    names.update(of_item(m))
    return names


def _item_tool_names(m: dict[str, Any], names: set[str]) -> None:
    """The tools one history item calls (a message's tool calls, a function_call item,
    tool_use content blocks)."""
    def add(v: Any) -> None:
        if isinstance(v, str) and v:
            names.add(v)

    if m.get("type") in ("function_call", "custom_tool_call", "mcp_call"):
        add(m.get("name"))
    for call in m.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            add(call["function"].get("name"))
    mfc = m.get("function_call")
    if isinstance(mfc, dict):
        add(mfc.get("name"))
    content = m.get("content")
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") in (
                    "tool_use", "server_tool_use", "mcp_tool_use"):
                add(block.get("name"))


class ProviderTool(NamedTuple):
    """A tool the provider runs itself. `tools`: the names an MCP server exposes to the
    model, None when the request does not restrict them (every tool the server has);
    `approval`: whether the provider asks the app before calling (`always`, `never`, or
    `never` when any tool is exempted; Anthropic never asks)."""

    type: str
    url: str
    label: str
    tools: tuple[str, ...] | None = ()
    approval: str = ""


def normalize_server_url(url: str) -> str:
    """`scheme://host[:port]/path?query` with scheme and host lower-cased and a default port
    dropped, so a glob on the URL sees what the provider will connect to. A URL with
    userinfo or an unparsable one is returned marked, so no allow-list glob matches it."""
    if not url or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "invalid:" + url
    if parts.username is not None or parts.password is not None or not host:
        return "invalid:" + url
    scheme = parts.scheme.lower()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"https": 443, "http": 80}.get(scheme):
        netloc += f":{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")


def _names(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _openai_mcp_tools(t: dict[str, Any]) -> tuple[str, ...] | None:
    allowed = t.get("allowed_tools")
    if isinstance(allowed, list):
        return _names(allowed)
    if isinstance(allowed, dict) and isinstance(allowed.get("tool_names"), list):
        return _names(allowed["tool_names"])
    return None  # absent, or a filter without names (read_only): any tool of the server


def _openai_mcp_approval(t: dict[str, Any]) -> str:
    ra = t.get("require_approval", "always")
    if isinstance(ra, str):
        return ra.lower()
    if isinstance(ra, dict) and ra.get("never"):
        return "never"  # some tools run without asking
    return "always"


def _anthropic_mcp_tools(srv: dict[str, Any], toolset: dict[str, Any] | None
                         ) -> tuple[str, ...] | None:
    exposed: tuple[str, ...] | None = None
    tc = srv.get("tool_configuration")
    if isinstance(tc, dict):
        if tc.get("enabled") is False:
            exposed = ()
        elif isinstance(tc.get("allowed_tools"), list):
            exposed = _names(tc["allowed_tools"])
    if toolset is not None:
        default = toolset.get("default_config")
        on_by_default = not (isinstance(default, dict) and default.get("enabled") is False)
        configs = toolset.get("configs")
        configs = configs if isinstance(configs, dict) else {}
        if on_by_default:
            off = {k for k, v in configs.items() if isinstance(v, dict)
                   and v.get("enabled") is False}
            if exposed is not None:
                exposed = tuple(n for n in exposed if n not in off)
        else:
            on = tuple(k for k, v in configs.items() if isinstance(k, str)
                       and isinstance(v, dict) and v.get("enabled") is True)
            exposed = on if exposed is None else tuple(n for n in exposed if n in on)
    return exposed


def provider_tools(body: dict[str, Any]) -> list[ProviderTool]:
    """Every tool the provider runs itself: a `tools` entry whose type is not a function
    the agent implements (OpenAI `web_search*`, `file_search`, `code_interpreter`,
    `computer_use*`, `image_generation`, `mcp` with `server_url` / `connector_id`,
    `allowed_tools` and `require_approval`; Anthropic typed server tools such as
    `web_search_20250305`), Anthropic's `mcp_servers` param (type `mcp`, its tools narrowed
    by `tool_configuration` and by the `mcp_toolset` tool naming it) and chat completions'
    `web_search_options` (type `web_search`). Types are lower-cased."""
    out: list[ProviderTool] = []
    servers = body.get("mcp_servers")
    servers = [s for s in servers if isinstance(s, dict)] if isinstance(servers, list) else []
    server_names = {s.get("name") for s in servers}
    toolsets: dict[str, dict[str, Any]] = {}
    tools = body.get("tools")
    for t in tools if isinstance(tools, list) else ():
        if not isinstance(t, dict):
            continue
        typ = t.get("type")
        if not isinstance(typ, str) or typ.lower() in ("function", "custom", ""):
            continue
        typ = typ.lower()
        if typ == "mcp_toolset" and t.get("mcp_server_name") in server_names:
            toolsets.setdefault(t["mcp_server_name"], t)  # judged with its server below
            continue
        url = t.get("server_url") or t.get("url") or t.get("connector_id") or ""
        label = t.get("server_label") or t.get("name") or t.get("mcp_server_name") or ""
        url = normalize_server_url(url) if isinstance(url, str) else ""
        label = label if isinstance(label, str) else ""
        if typ == "mcp":
            out.append(ProviderTool(typ, url, label, _openai_mcp_tools(t),
                                    _openai_mcp_approval(t)))
        elif typ == "mcp_toolset":  # names no declared server: an MCP server, unknown URL
            out.append(ProviderTool("mcp", url, label, None, "never"))
        else:
            out.append(ProviderTool(typ, url, label))
    for srv in servers:
        url, name = srv.get("url") or "", srv.get("name") or ""
        name = name if isinstance(name, str) else ""
        out.append(ProviderTool("mcp", normalize_server_url(url) if isinstance(url, str) else "",
                                name, _anthropic_mcp_tools(srv, toolsets.get(name)), "never"))
    for key, typ in _OPTION_TOOLS.items():
        if body.get(key) is not None:
            out.append(ProviderTool(typ, "", ""))
    return out

# ---------------------------------------------------------------- conditions
Check = Callable[[RequestFacts], bool]


@dataclass(frozen=True)
class Condition:
    """One compiled condition of a rule's `match`. `cost` orders evaluation only."""

    key: str
    check: Check
    cost: int = 0


def glob_any(patterns: Iterable[str], *, lower: bool = True) -> Callable[[str], bool]:
    """One compiled regex for a list of shell globs (`*`, `?`, `[...]`)."""
    import fnmatch
    pats = [p.lower() if lower else p for p in patterns]
    rx = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats) or r"(?!)")
    if lower:
        return lambda s: rx.match(s.lower()) is not None
    return lambda s: rx.match(s) is not None


_NUM = (int, float)


def is_number(v: Any) -> bool:
    return isinstance(v, _NUM) and not isinstance(v, bool)


def as_number(value: Any) -> int | float | None:
    """A number, or a string that spells one (`"11"`, `" 1e3 "`); None otherwise.
    NaN is not a number here: every comparison with it is false, so it would pass."""
    if is_number(value):
        return None if isinstance(value, float) and math.isnan(value) else value
    if isinstance(value, str) and 0 < len(value) <= 64:
        try:
            n = float(value.strip())
        except ValueError:
            return None
        if math.isnan(n):
            return None
        return int(n) if n.is_integer() and abs(n) < 2**63 else n
    return None


def compare(op: str, value: Any, ref: Any) -> bool:
    """`value OP ref` for one field value.

    Ordering needs a number: a numeric string counts as its number (`n: "11"` > 10, as
    providers read it); any other value where a number is compared raises
    BodyUnavailable (the request is refused rather than the rule silently not matching).
    Equality with a number ref also accepts the numeric string."""
    if is_number(ref):
        num = None if isinstance(value, bool) else as_number(value)
        if num is not None:
            value = num
        elif op in (">", ">=", "<", "<="):
            raise BodyUnavailable(f"a field compared with {ref!r} is not a number")
    if op in (">", ">=", "<", "<="):
        if not (is_number(value) and is_number(ref)):
            return False
        if op == ">":
            return value > ref
        if op == ">=":
            return value >= ref
        if op == "<":
            return value < ref
        return value <= ref
    if op in ("==", "!="):
        same = _equal(value, ref)
        return same if op == "==" else not same
    if op == "in":
        return any(_equal(value, r) for r in ref)
    if op == "not_in":
        return not any(_equal(value, r) for r in ref)
    if op == "matches":
        return isinstance(value, str) and ref.search(value) is not None
    raise ValueError(f"unknown operator {op!r}")


def _equal(a: Any, b: Any) -> bool:
    if is_number(a) and is_number(b):
        return a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return type(a) is type(b) and a == b


def resolve_path(doc: Any, path: tuple[str, ...]) -> list[Any]:
    """Values at a dotted path; `*` (or a list on the way) fans out to every element."""
    current = [doc]
    for seg in path:
        nxt: list[Any] = []
        for node in current:
            if isinstance(node, dict):
                if seg == "*":
                    nxt.extend(node.values())
                elif seg in node:
                    nxt.append(node[seg])
            elif isinstance(node, list):
                if seg == "*":
                    nxt.extend(node)
                elif seg.lstrip("-").isdigit():
                    i = int(seg)
                    if -len(node) <= i < len(node):
                        nxt.append(node[i])
                else:
                    # a list on the way: look inside each element (`messages.role`)
                    nxt.extend(e[seg] for e in node if isinstance(e, dict) and seg in e)
        current = nxt
        if not current:
            break
    return current


@dataclass(frozen=True)
class FieldTest:
    """One test on a JSON field: (op, ref) pairs that must all hold, or presence."""

    path: tuple[str, ...]
    present: bool | None  # True: must exist, False: must be absent, None: compare
    ops: tuple[tuple[str, Any], ...] = ()

    def __call__(self, facts: RequestFacts) -> bool:
        values = resolve_path(facts.json, self.path)
        if self.present is not None:
            return bool(values) == self.present
        # any value at the path that satisfies every comparison
        return any(all(compare(op, v, ref) for op, ref in self.ops) for v in values)


def tokens_test(ops: tuple[tuple[str, Any], ...]) -> Check:
    """`output_tokens`: holds when the largest limit the request gives (in any spelling)
    satisfies every comparison; no limit at all holds for no comparison."""
    def check(f: RequestFacts) -> bool:
        values = f.output_tokens
        if not values:
            return False
        nums = []
        for v in values:
            n = as_number(v) if not isinstance(v, bool) else None
            if n is None:
                raise BodyUnavailable("an output token limit is not a number")
            nums.append(n)
        top = max(nums)
        return all(compare(op, top, ref) for op, ref in ops)
    return check


def provider_tools_test(types: Callable[[str], bool] | None,
                        urls: Callable[[str], bool] | None,
                        *, not_urls: Callable[[str], bool] | None = None,
                        tools: Callable[[str], bool] | None = None,
                        not_tools: Callable[[str], bool] | None = None,
                        approval: Callable[[str], bool] | None = None) -> Check:
    """Some provider-side tool for which every given test holds: its type, its server URL
    (`urls`; `not_urls`: a URL none of those globs allows), the tool names its server
    exposes (`tools`: one of them matches; `not_tools`: one of them is not allowed) and its
    require_approval. A server whose tools the request does not restrict exposes every
    tool, so it matches both `tools` and `not_tools`: an allow-list cannot be bypassed by
    omitting allowed_tools."""
    def check(f: RequestFacts) -> bool:
        for t in f.provider_tools:
            if types is not None and not types(t.type):
                continue
            if urls is not None and not urls(t.url):
                continue
            if not_urls is not None and not_urls(t.url):
                continue
            if tools is not None and not (t.tools is None or any(tools(n) for n in t.tools)):
                continue
            if not_tools is not None and not (
                    t.tools is None or any(not not_tools(n) for n in t.tools)):
                continue
            if approval is not None and not approval(t.approval):
                continue
            return True
        return False
    return check

def size_test(ops: tuple[tuple[str, int], ...]) -> Check:
    return lambda f: all(compare(op, f.body_size, ref) for op, ref in ops)


@dataclass(frozen=True)
class TimeWindow:
    tz: datetime.tzinfo
    tz_name: str
    start: int | None  # minutes after midnight
    end: int | None
    days: frozenset[int]  # 0 = Monday

    def __call__(self, facts: RequestFacts) -> bool:
        t = facts.local_time(self.tz, self.tz_name)
        if self.days and t.weekday() not in self.days:
            return False
        if self.start is None or self.end is None:
            return True
        m = t.hour * 60 + t.minute
        if self.start < self.end:
            return self.start <= m < self.end
        return m >= self.start or m < self.end  # window across midnight


def prompt_test(pattern: re.Pattern[str], text: str = "prompt_text") -> Check:
    """Search one form of the prompt text (`prompt_text`, `norm_text` or `skel_text`),
    behind a literal prefilter when the pattern has one.

    Python's `re` tries a pattern that starts with `\\b` or a look-behind at every
    position of the text (~100 µs for 2 KB); a substring test for a literal that every
    match must contain costs ~1 µs, so with many prompt rules almost all searches are
    skipped. The prefilter is sound: it only skips a search that cannot match.
    """
    lits = required_literals(pattern)
    fast = search_twin(pattern)
    whole = anchor_twin(pattern)
    if not lits:
        return lambda f: f.search(pattern, text, fast, whole)

    def check(f: RequestFacts) -> bool:
        return f.has_literal(lits, text) and f.search(pattern, text, fast, whole)
    return check


def any_prompt_test(patterns: tuple[Any, ...]) -> Check:
    """True when any of the patterns matches (each behind its own prefilter). Items are
    patterns (searched in `prompt_text`) or (pattern, text attribute) pairs."""
    checks = tuple(prompt_test(*p) if isinstance(p, tuple) else prompt_test(p)
                   for p in patterns)
    if len(checks) == 1:
        return checks[0]
    return lambda f: any(c(f) for c in checks)


# ---------------------------------------------------------------- literal prefilter
try:  # the exact case folding of `re` (simple lower-casing plus its extra equivalences)
    from _sre import unicode_tolower as _tolower
    from re import _constants as _sre_c
    from re import _parser as _sre_parse
    from re._casefix import _EXTRA_CASES
    from re._compiler import compile as _sre_compile
except ImportError:  # pragma: no cover - another Python: run every search unfiltered
    _tolower = None

_CANON: dict[int, str] = {}
_ASCII_FOLD = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _canon(cp: int) -> str:
    """One representative per class of characters that `re.IGNORECASE` treats as equal."""
    c = _CANON.get(cp)
    if c is None:
        low = _tolower(cp)
        c = _CANON[cp] = chr(min((low, *_EXTRA_CASES.get(low, ()))))
    return c


def fold(text: str) -> str:
    """Map every character to its case class, one character for one (so substrings of
    the text fold to substrings of the folded text)."""
    if text.isascii():
        return text.lower()
    table: dict[int, Any] = dict(_ASCII_FOLD)
    for ch in set(text):
        if not ch.isascii():
            table[ord(ch)] = _canon(ord(ch))
    return text.translate(table)


def required_literals(pattern: re.Pattern[str], min_len: int = 2) -> frozenset[str] | None:
    """Folded strings of which every match of `pattern` contains at least one, or None."""
    if _tolower is None:
        return None
    try:
        tree = _sre_parse.parse(pattern.pattern, pattern.flags)
        lits = _alternatives(list(tree))
    except Exception:  # noqa: BLE001 - private parser API: fall back to plain search
        return None
    if not lits or min(len(x) for x in lits) < min_len:
        return None
    return frozenset(fold(x) for x in lits)


def _alternatives(items: list[Any]) -> frozenset[str] | None:
    cands: list[frozenset[str]] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            cands.append(frozenset({"".join(run)}))
            run.clear()

    for op, av in items:
        if op is _sre_c.LITERAL:
            run.append(chr(av))
            continue
        flush()
        sub: frozenset[str] | None = None
        if op is _sre_c.SUBPATTERN:
            sub = _alternatives(list(av[-1]))
        elif op is _sre_c.BRANCH:
            subs = [_alternatives(list(b)) for b in av[1]]
            if subs and all(subs):
                sub = frozenset().union(*subs)
        elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, _sre_c.POSSESSIVE_REPEAT) \
                and av[0] >= 1:
            sub = _alternatives(list(av[2]))
        if sub:
            cands.append(sub)
    flush()
    # the most selective requirement: the one whose shortest alternative is longest
    return max(cands, key=lambda s: (min(len(x) for x in s), -len(s)), default=None)


# ---------------------------------------------------------------- search twins
# Python's `re` finds a pattern that starts with a literal or a character class quickly: it
# skips to the next position holding that character (C code) before trying the pattern.
# A leading zero-width assertion (`\b`, `\B`, a look-behind) turns that off, so the whole
# pattern is tried at every position of the text: `\b\d{3}-\d{2}-\d{4}\b` costs ~2 ms
# per 100 KB. Its twin moves the first character in front and checks the assertion behind
# it: `\d(?<=\b\d)\d{2}-\d{2}-\d{4}\b`. At every position the twin matches exactly
# where and what the original matches (the look-behind re-checks the assertion at the
# character's start and the character itself), so search() gives the same answer, at any
# `pos` (look-behinds and \b see the text before `pos` in both).
_TWINS: dict[tuple[str, int], re.Pattern[str]] = {}
MAX_TWINS = 4096


def search_twin(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """A pattern with the same matches as `pattern` that `re` searches faster, or
    `pattern` itself when there is no such rewrite (or anything about it is unsure)."""
    return _remembered(_TWINS, _make_twin, pattern, pattern)


def _remembered(cache: dict[tuple[str, int], Any], make: Callable[[re.Pattern[str]], Any],
                pattern: re.Pattern[str], fallback: Any) -> Any:
    """make(pattern), remembered per (source, flags) in `cache` (bounded: MAX_TWINS);
    `fallback` without the private parser API or when make fails."""
    if _tolower is None:
        return fallback
    key = (pattern.pattern, pattern.flags)
    if key in cache:
        return cache[key]
    try:
        out = make(pattern)
    except Exception:  # noqa: BLE001 - private parser API: the plain search then
        out = fallback
    if len(cache) >= MAX_TWINS:
        cache.clear()
    cache[key] = out
    return out


def _make_twin(pattern: re.Pattern[str]) -> re.Pattern[str]:
    c = _sre_c
    single = (c.LITERAL, c.NOT_LITERAL, c.IN)
    tree = _sre_parse.parse(pattern.pattern, pattern.flags)
    data = list(tree.data)
    if len(data) < 2:
        return pattern
    (aop, aav), (op, av) = data[0], data[1]
    zero_width = (aop is c.AT and aav in (c.AT_BOUNDARY, c.AT_NON_BOUNDARY)) or \
        (aop in (c.ASSERT, c.ASSERT_NOT) and aav[0] == -1)
    if not zero_width:
        return pattern
    if op in single:
        first, rest = (op, av), data[2:]
    elif op in (c.MAX_REPEAT, c.MIN_REPEAT) and av[0] >= 1 and len(av[2]) == 1 \
            and av[2][0][0] in single:
        lo, hi, item = av
        first = item[0]
        left_hi = hi if hi == c.MAXREPEAT else hi - 1
        rest = ([(op, (lo - 1, left_hi, item))] if left_hi != 0 else []) + data[2:]
    else:
        return pattern
    behind = _sre_parse.SubPattern(tree.state, [data[0], first])
    new = _sre_parse.SubPattern(tree.state, [first, (c.ASSERT, (-1, behind)), *rest])
    twin = _sre_compile(new, pattern.flags)
    if twin.groups != pattern.groups:
        return pattern
    return twin


# A pattern whose first literal comes after a fixed-width start (`\b\d{3}-...`) is
# searched from that literal: `-(?<=\b\d{3}-)\d{2}-\d{4}\b`. `re` then skips to the next
# '-' in C (a literal prefix) instead of trying the start at every digit (~9.5 -> ~1 us
# per 1 KB prompt). The anchored pattern matches at q exactly when the original matches
# at q - width(start), so a search of a whole text (pos 0) finds a match exactly when the
# original does. From pos > 0 its look-behind may find a match of the original that
# starts up to width(start) before pos; SearchHistory.search starts at `common - reach`
# only when the session's previous text had no match, and a match starting before that
# lies within the shared prefix (reach covers its length and look-around): it would have
# been in the previous text. So there the anchor answers exactly as the pattern too. It is
# not a twin for any pos (search_twin is: it keeps pos semantics).
_ANCHORS: dict[tuple[str, int], re.Pattern[str] | None] = {}


def anchor_twin(pattern: re.Pattern[str]) -> re.Pattern[str] | None:
    """The literal-anchored rewrite of `pattern` (see above), or None."""
    return _remembered(_ANCHORS, _make_anchor, pattern, None)


def _fixed_simple(items: list[Any]) -> bool:
    """Items of one fixed width without groups: assertions (\b, look-behinds of such
    items), single characters and exact repeats of one (nothing that could number a
    group or reach a back-reference)."""
    c = _sre_c
    single = (c.IN, c.NOT_LITERAL, c.ANY, c.LITERAL)
    for op, av in items:
        if op is c.AT or op in single:
            continue
        if op in (c.ASSERT, c.ASSERT_NOT) and av[0] == -1 and _fixed_simple(list(av[1])):
            continue  # a look-behind of such items (zero width)
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT) and av[0] == av[1] \
                and len(av[2]) == 1 and av[2][0][0] in single:
            continue
        return False
    return True


def _make_anchor(pattern: re.Pattern[str]) -> re.Pattern[str] | None:
    c = _sre_c
    tree = _sre_parse.parse(pattern.pattern, pattern.flags)
    data = list(tree.data)
    k = next((i for i, (op, _) in enumerate(data) if op is c.LITERAL), None)
    if not k:  # no literal, or the pattern starts with it (`re` uses it already)
        return None
    lit = data[k]
    ch = chr(lit[1])
    if pattern.flags & re.IGNORECASE and (not ch.isascii() or ch.isalpha()):
        return None  # a cased literal is no literal prefix for `re` under IGNORECASE
    if not _fixed_simple(data[:k]):
        return None
    behind = _sre_parse.SubPattern(tree.state, [*data[:k], lit])
    lo, hi = behind.getwidth()
    if lo != hi:
        return None
    new = _sre_parse.SubPattern(tree.state, [lit, (c.ASSERT, (-1, behind)), *data[k + 1:]])
    twin = _sre_compile(new, pattern.flags)
    if twin.groups != pattern.groups or twin.groupindex != pattern.groupindex:
        return None
    return twin


# ---------------------------------------------------------------- incremental prompt search
# An agent re-sends its whole history every turn, so its prompt text grows by appending:
# searching it all again costs O(history) per turn. A session remembers, per text form, the
# last text searched, and per pattern whether it matched that text. When it did not, a
# match in the new text must consult a character past the prefix both texts share (else it
# was in the old text too): it starts at most `reach` characters before the end of that
# prefix (reach = the pattern's longest match plus its look-around widths plus one
# character each side for \b, ^, $). So the search starts there; the answer is exactly
# that of a full search (tests/policy/test_incremental.py, differential). Patterns without
# a bounded reach (\s+, .*, back-references) are searched whole.
# The shared prefix is found by comparing the texts themselves (memcmp: ~10 us for 120 KB)
# rather than by hashing both (SHA-256 per 4 KB block: 110 us per form and turn); the
# texts are kept in memory only, bounded in bytes (SearchHistories), never logged.
INCREMENTAL_MIN_CHARS = 8192
BLOCK_CHARS = 4096


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b` (C comparisons: the usual
    case, `a` a prefix of `b`, is one memcmp; else block by block, then bisected)."""
    n = min(len(a), len(b))
    if b.startswith(a[:n] if n < len(a) else a):
        return n
    lo, step = 0, BLOCK_CHARS
    while lo + step <= n and a[lo:lo + step] == b[lo:lo + step]:
        lo += step
    hi = min(lo + step, n)
    while lo < hi:  # a[:lo] == b[:lo]; the largest such lo up to hi
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# The normalised forms of the prompt text (skeleton, normalize) are built from the new
# part of a session's text alone: both split at any ASCII letter or digit,
# fn(a + b) == fn(a) + fn(b) when b starts with one (addons/policy/skeleton.py; every
# step there maps characters one by one or, as NFKC/NFD/NFC and the hyphenation join,
# cannot reach across such a character; tests/policy/test_skeleton.py checks it on
# arbitrary Unicode). So a text is cut at such characters every CUT_CHARS or so, and the
# form remembers where each cut falls in it: fn(text) = out[:s] + fn(text[j:]) for a
# cut (j, s) inside the prefix the new text shares with the old one.
CUT_CHARS = 4096
_CUT_AT = re.compile(r"[0-9A-Za-z]")


def derive_text(fn: Callable[[str], str], src: str,
                old: tuple[str, tuple[tuple[int, int], ...]] | None, common: int
                ) -> tuple[str, tuple[tuple[int, int], ...], int]:
    """(fn(src), its cuts, characters of src taken from `old` unprocessed). `old`: the
    form's last (out, cuts) whose source shares its first `common` characters with src.
    Cuts (j, s): src[j] is a cut character (or j == 0) and out[:s] == fn(src[:j])."""
    cuts: list[tuple[int, int]] = [(0, 0)]
    head = ""
    if old is not None:
        out_old, old_cuts = old
        k = bisect.bisect_left(old_cuts, (common, -1)) - 1  # the last cut before common
        if k > 0:
            cuts = list(old_cuts[:k + 1])
            head = out_old[:cuts[-1][1]]
    j, s = cuts[-1]
    kept = j
    parts = [head] if head else []
    n = len(src)
    while True:
        m = _CUT_AT.search(src, j + CUT_CHARS) if j + CUT_CHARS < n else None
        end = m.start() if m else n
        piece = fn(src[j:end])
        parts.append(piece)
        s += len(piece)
        if m is None:
            break
        cuts.append((end, s))
        j = end
    return "".join(parts), tuple(cuts), kept


_REACH: dict[tuple[str, int], int | None] = {}


def pattern_reach(pattern: re.Pattern[str]) -> int | None:
    """How far before its start and after its end a match of `pattern` may look, plus its
    longest match: None when unbounded or not known."""
    key = (pattern.pattern, pattern.flags)
    if key in _REACH:
        return _REACH[key]
    r: int | None
    try:
        tree = _sre_parse.parse(pattern.pattern, pattern.flags)
        hi = tree.getwidth()[1]
        extra = _assert_width(list(tree))
        r = None if extra is None or hi >= _sre_c.MAXREPEAT or hi > 1 << 16 \
            else hi + extra + 2
    except Exception:  # noqa: BLE001 - private parser API: search whole
        r = None
    if len(_REACH) < 4096:
        _REACH[key] = r
    return r


def _assert_width(items: list[Any]) -> int | None:
    """The summed widths of every look-around in a parsed pattern; None if one is
    unbounded or the pattern refers back to a group (its width is the group's)."""
    total = 0
    for op, av in items:
        sub: list[list[Any]] = []
        if op in (_sre_c.GROUPREF, _sre_c.GROUPREF_EXISTS):
            return None
        if op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            w = av[1].getwidth()[1]
            if w >= _sre_c.MAXREPEAT:
                return None
            total += w
            sub = [list(av[1])]
        elif op is _sre_c.SUBPATTERN:
            sub = [list(av[-1])]
        elif op is _sre_c.BRANCH:
            sub = [list(b) for b in av[1]]
        elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, _sre_c.POSSESSIVE_REPEAT):
            sub = [list(av[2])]
        elif op is _sre_c.ATOMIC_GROUP:
            sub = [list(av)]
        for s in sub:
            w2 = _assert_width(s)
            if w2 is None:
                return None
            total += w2
    return total


def _text_bytes(text: str) -> int:
    return 64 + (len(text) if text.isascii() else 4 * len(text))


class ListText(NamedTuple):
    """What a session's last request's prompt text holds of its message list: per item,
    the length of the list's strings joined up to it (-1: none yet) and the nested-JSON
    budget they took up to it; `memo`: the generation of that request's parse memo
    (addons/frame/decode.py), whose items the next parse of the session hands on as the
    very same objects (Body.reused of them, from Body.reused_from) — so no item is held
    here and none is compared; `gen`/`start`: the prompt text (generation) and the offset
    in it where the list's strings begin."""
    ends: tuple[int, ...]
    used: tuple[int, ...]
    memo: int
    gen: int
    start: int


class ListTools(NamedTuple):
    """Per item of a session's last message list (parse memo generation `memo`), the tool
    names its items call up to it."""
    tools: tuple[frozenset[str], ...]
    memo: int


def _record_bytes(rec: Any) -> int:
    if rec is None:
        return 0
    if isinstance(rec, ListText):
        return 128 + 72 * len(rec.ends)   # two references and two numbers per item
    return 128 + 8 * len(rec.tools)       # a reference (the sets are shared) per item


class SearchHistory:
    """One session's last prompt searches: per text form its last text, per (pattern,
    text form) the generation of the text it was last searched in and whether it matched;
    per literal prefilter where it was first found; per message list its items with
    their strings' place in the last prompt text and their tool names; for the normalised
    forms, the cuts that let the next text's form be built from its new part alone.
    Bounded in entries; its texts count against its SearchHistories' bytes. Thread-safe
    (concurrent requests of a session: each compares with whichever text was last)."""

    __slots__ = ("_seen", "_texts", "_lock", "last_used", "max_entries", "saved_chars",
                 "bytes", "_gen", "_store", "_ident", "_records", "derived_chars")

    def __init__(self, max_entries: int = 512) -> None:
        self._seen: dict[tuple[Any, str], tuple[int, Any]] = {}
        # per text form: (generation, text, what goes with it: cuts for a derived form)
        self._texts: dict[str, tuple[int, str, Any]] = {}
        # per ("text" | "tools", list key): ListText / ListTools of the last request
        self._records: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.last_used = 0.0
        self.max_entries = max_entries
        self.saved_chars = 0  # characters not searched again (for tests and benchmarks)
        self.derived_chars = 0  # characters not normalised again (ditto)
        self.bytes = 0
        self._gen = 0
        self._store: SearchHistories | None = None
        self._ident = ""

    def __len__(self) -> int:
        return len(self._seen)

    def __repr__(self) -> str:  # never show text
        return f"<SearchHistory {len(self._seen)} searches, {self.bytes} bytes>"

    def begin(self, which: str, text: str, extra: Any = None) -> tuple[int, int, int]:
        """A request's `which` text: (the generation of the form's previous text, the
        length of the prefix both share, this text's generation, now the form's last)."""
        with self._lock:
            old = self._texts.get(which)
            self._gen += 1
            gen = self._gen
            self._texts[which] = (gen, text, extra)
            delta = _text_bytes(text) - (_text_bytes(old[1]) if old else 0)
            self.bytes += delta
        self._charge(delta)
        if old is None:
            return 0, 0, gen
        return old[0], common_prefix(old[1], text), gen

    def _charge(self, delta: int) -> None:
        store = self._store
        if store is not None and delta:
            store._account(self, delta)

    def last(self, which: str) -> tuple[int, str, Any] | None:
        with self._lock:
            return self._texts.get(which)

    def derive(self, which: str, fn: Callable[[str], str], src: str,
               src_shared: tuple[int, int, int]) -> tuple[str, tuple[int, int, int]]:
        """fn(src) (`skeleton` or `normalize` of the prompt text, `src`), built from the
        form's last text where `src` shares its prefix with the prompt text that one was
        made from (`src_shared`: begin("prompt_text", src)); then begun as `which`'s
        text. (derive_text says why the result is exactly fn(src).)"""
        old_gen, common, gen = src_shared
        last = self.last(which)
        old: tuple[str, tuple[tuple[int, int], ...]] | None = None
        if last is not None and old_gen and isinstance(last[2], tuple) \
                and last[2][0] == old_gen:
            old = (last[1], last[2][1])
        out, cuts, kept = derive_text(fn, src, old, common)
        if len(out) == len(src) and out == src:
            # (normalising prose in ASCII changes nothing) the form is the prompt text
            # itself: one string kept for both, not two equal ones (a memcmp, ~10 us)
            out = src
        self.derived_chars += kept
        return out, self.begin(which, out, (gen, cuts))

    def contains(self, lits: Iterable[str], which: str, text: str,
                 shared: tuple[int, int, int], folded: Callable[[int], str]) -> bool:
        """Is one of `lits` (case folded) in the case-folded `text`? Only where the text
        is new since the session's last one, unless a literal was seen in the shared
        part. `folded(start)`: the folded text from `start` (case folding maps each
        character to one: it is the folded text's own suffix)."""
        old_gen, common, gen = shared
        todo: list[tuple[str, int]] = []
        with self._lock:
            for lit in lits:
                prev = self._seen.get((lit, which))
                start = 0
                if prev is not None and prev[0] == old_gen and old_gen:
                    pos = prev[1]
                    if 0 <= pos and pos + len(lit) <= common:
                        # the first place it was found is unchanged: still the first
                        self._seen[(lit, which)] = (gen, pos)
                        self.saved_chars += common
                        return True
                    if pos < 0:  # not in the last text: a new one ends past `common`
                        start = max(0, common - len(lit) + 1)
                todo.append((lit, start))
        if not todo:
            return False
        base = min(st for _, st in todo)
        window = folded(base)
        found = False
        results: list[tuple[str, int]] = []
        for lit, start in todo:
            i = window.find(lit, start - base)
            pos = base + i if i >= 0 else -1
            results.append((lit, pos))
            if pos >= 0:
                found = True
                break
        with self._lock:
            for lit, pos in results:
                key = (lit, which)
                if key in self._seen or len(self._seen) < self.max_entries:
                    self._seen[key] = (gen, pos)
            self.saved_chars += base
        return found

    def record(self, key: Any) -> Any:
        with self._lock:
            return self._records.get(key)

    def set_record(self, key: Any, rec: Any) -> None:
        """A ListText / ListTools of this request (ListText only while its prompt text is
        the form's last: its offsets refer to that text)."""
        with self._lock:
            if isinstance(rec, ListText):
                last = self._texts.get("prompt_text")
                if last is None or last[0] != rec.gen:
                    return
            delta = _record_bytes(rec) - _record_bytes(self._records.get(key))
            self._records[key] = rec
            self.bytes += delta
        self._charge(delta)

    def search(self, pattern: re.Pattern[str], which: str, text: str,
               shared: tuple[int, int, int], fast: re.Pattern[str] | None = None) -> bool:
        """Does `pattern` match `text`? `shared`: begin(which, text) of this request."""
        reach = pattern_reach(pattern)
        runner = fast or pattern  # search_twin(pattern): same matches, keyed as `pattern`
        if reach is None:
            return runner.search(text) is not None
        old_gen, common, gen = shared
        key = (pattern, which)
        with self._lock:
            prev = self._seen.get(key)
        start = 0
        if prev is not None and prev[0] == old_gen and old_gen and not prev[1]:
            start = max(0, common - reach)
        # search(text, pos) still lets \b and look-behinds see the characters before pos
        matched = runner.search(text, start) is not None
        with self._lock:
            if key in self._seen or len(self._seen) < self.max_entries:
                self._seen[key] = (gen, matched)
            self.saved_chars += start
        return matched

    def _forget_texts(self) -> int:  # the histories' lock held: dropped from the store
        with self._lock:
            freed, self.bytes = self.bytes, 0
            self._texts.clear()
            self._records.clear()
            return freed


class SearchHistories:
    """Every session's SearchHistory, by session key; bounded in sessions and in the bytes
    of the texts they keep (`max_bytes` in all; one identity, the key's part before NUL,
    at most 1/`identity_share` of both: over it, its own least recently used sessions
    go first), least recently used out, expiring after an idle time. A history dropped
    only means full searches for that session's next request."""

    def __init__(self, max_sessions: int = 4096, idle_ttl: float = 3600.0,
                 clock: Callable[[], float] | None = None, max_bytes: int = 16 << 20,
                 identity_share: int = 2) -> None:
        import time
        self._h: OrderedDict[str, SearchHistory] = OrderedDict()
        self._ident_bytes: dict[str, int] = {}
        # per identity: its sessions, least recently used first
        self._by_ident: dict[str, OrderedDict[str, SearchHistory]] = {}
        self._lock = threading.Lock()
        self.max_sessions = max_sessions
        self.idle_ttl = idle_ttl
        self.max_bytes = max_bytes
        self.identity_share = max(1, identity_share)
        self.bytes = 0
        self._clock = clock or time.monotonic

    def __len__(self) -> int:
        return len(self._h)

    def __repr__(self) -> str:
        return f"<SearchHistories {len(self._h)} sessions, {self.bytes} bytes>"

    def get(self, key: str) -> SearchHistory:
        now = self._clock()
        ident = key.partition("\x00")[0]
        with self._lock:
            while self._h:
                k, h = next(iter(self._h.items()))
                if now - h.last_used <= self.idle_ttl:
                    break
                self._drop(k)
            h = self._h.get(key)
            if h is None:
                h = self._h[key] = SearchHistory()
                h._store, h._ident = self, ident
                self._by_ident.setdefault(ident, OrderedDict())[key] = h
                self._shrink(h)
            else:
                self._h.move_to_end(key)
                self._by_ident[ident].move_to_end(key)
            h.last_used = now
            return h

    def _account(self, h: SearchHistory, delta: int) -> None:
        with self._lock:
            if h._store is not self:
                return  # dropped meanwhile: it no longer counts
            self.bytes += delta
            self._ident_bytes[h._ident] = self._ident_bytes.get(h._ident, 0) + delta
            if delta > 0:
                self._shrink(h)

    def _drop(self, key: str) -> None:  # the lock held
        h = self._h.pop(key)
        h._store = None
        freed = h._forget_texts()
        self.bytes -= freed
        ident = h._ident
        own = self._by_ident.get(ident)
        if own is not None:
            own.pop(key, None)
        if own:
            self._ident_bytes[ident] = self._ident_bytes.get(ident, 0) - freed
        else:
            self._by_ident.pop(ident, None)
            self._ident_bytes.pop(ident, None)

    def _shrink(self, keep: SearchHistory) -> None:  # the lock held
        ident = keep._ident
        share_n = max(1, self.max_sessions // self.identity_share)
        share_b = self.max_bytes // self.identity_share
        own = self._by_ident.get(ident)
        while own and len(own) > 1 and (len(own) > share_n
                                        or self._ident_bytes.get(ident, 0) > share_b):
            k = next(iter(own))
            if own[k] is keep:
                own.move_to_end(k)
                k = next(iter(own))
            self._drop(k)
        while (len(self._h) > self.max_sessions or self.bytes > self.max_bytes) \
                and len(self._h) > 1:
            k = next(iter(self._h))
            if self._h[k] is keep:
                self._h.move_to_end(k)
                k = next(iter(self._h))
            self._drop(k)
        if keep._store is self and keep.bytes > self.max_bytes:
            freed = keep._forget_texts()  # alone over the total: keeps no text
            self.bytes -= freed
            self._ident_bytes[ident] = self._ident_bytes.get(ident, 0) - freed


def tools_test(match: Callable[[str], bool]) -> Check:
    return lambda f: any(match(n) for n in f.tool_names)


# ---------------------------------------------------------------- rules and decisions
@dataclass(frozen=True)
class ApprovalSpec:
    groups: tuple[str, ...]
    min_approvals: int = 1
    # None: not set by the rule; the approval addon applies the `approvals` section's
    # default_timeout / on_timeout (300 s, deny)
    timeout: float | None = None
    on_timeout: str | None = None
    allow_mitmweb: bool = False

    def to_metadata(self) -> dict[str, Any]:
        return {"groups": list(self.groups), "min_approvals": self.min_approvals,
                "timeout": self.timeout, "on_timeout": self.on_timeout,
                "allow_mitmweb": self.allow_mitmweb}


@dataclass(frozen=True)
class Match:
    """All conditions must hold. An empty match holds for every request."""

    conditions: tuple[Condition, ...] = ()
    checks: tuple[Check, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the bare callables, so the per-request loop does no attribute lookups
        object.__setattr__(self, "checks", tuple(c.check for c in self.conditions))

    def __call__(self, facts: RequestFacts) -> bool:
        for check in self.checks:
            if not check(facts):
                return False
        return True

    @property
    def cost(self) -> int:
        return max((c.cost for c in self.conditions), default=0)


@dataclass(frozen=True)
class PolicyRule:
    name: str
    match: Match
    action: str
    message: str = ""
    observe: bool = False  # record the would-be decision, never enforce it
    approval: ApprovalSpec | None = None
    where: str = field(default="", compare=False)

    @property
    def observing(self) -> bool:
        return self.observe or self.action == "observe"


@dataclass(frozen=True)
class Decision:
    action: str
    rule: str
    message: str = ""
    observed: bool = False
    approval: ApprovalSpec | None = None
    observations: tuple[tuple[str, str], ...] = ()  # (rule, would-be action)

    @property
    def enforced_action(self) -> str:
        """What the gateway does: allow, block or approve (observed decisions pass)."""
        return "allow" if self.observed else self.action

    def to_metadata(self) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action, "rule": self.rule,
                             "message": self.message, "observed": self.observed}
        # The approval part is present exactly when the flow must be held.
        if self.approval is not None and self.action == "approve" and not self.observed:
            d["approval"] = self.approval.to_metadata()
        if self.observations:
            d["observations"] = [{"rule": r, "action": a} for r, a in self.observations]
        return d


@dataclass(frozen=True)
class PolicySet:
    rules: tuple[PolicyRule, ...] = ()
    observe_only: bool = False

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rules:
            key = f"{r.action}(observe)" if r.observe and r.action != "observe" else r.action
            counts[key] = counts.get(key, 0) + 1
        parts = [f"{n} {a}" for a, n in counts.items()]
        text = f"{len(self.rules)} rules" + (f" ({', '.join(parts)})" if parts else "")
        return text + ("; mode observe_only" if self.observe_only else "")

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):
        return iter(self.rules)

    def evaluate(self, facts: RequestFacts, *, observe_only: bool = False) -> Decision:
        return evaluate(self, facts, observe_only=observe_only)


_STRICTNESS = {"allow": 0, "approve": 1, "block": 2}


def evaluate(policies: PolicySet, facts: RequestFacts, *,
             observe_only: bool = False) -> Decision:
    """The decision for one request (see the module docstring for the order).

    A batch (a `/files` upload with purpose=batch, an inline `/batches` request list) is
    judged as itself and as every request it carries: the strictest enforced decision
    wins (block > approve > allow), and a decision taken for a carried request names it.

    Raises BodyUnavailable when a rule needs a body that cannot be read: the caller
    refuses the request rather than guess (fail closed).
    """
    decision = evaluate_one(policies, facts, observe_only=observe_only)
    if decision.enforced_action == "block" or not policies.rules:
        return decision
    for sub in facts.batch():
        d = evaluate_one(policies, sub, observe_only=observe_only)
        if _STRICTNESS[d.enforced_action] > _STRICTNESS[decision.enforced_action]:
            msg = f"{sub.label}: {d.message}" if d.message else sub.label
            decision = Decision(d.action, d.rule, msg, d.observed, d.approval,
                                decision.observations + d.observations)
            if d.enforced_action == "block":
                break
    return decision


def evaluate_one(policies: PolicySet, facts: RequestFacts, *,
                 observe_only: bool = False) -> Decision:
    """The decision for one request, not looking into batches."""
    observations: list[tuple[str, str]] = []
    first_obs: PolicyRule | None = None
    for rule in policies.rules:
        for check in rule.match.checks:  # Match.__call__ inlined: this is the hot loop
            if not check(facts):
                break
        else:  # every condition held
            if rule.observing:
                observations.append((rule.name, rule.action))
                if first_obs is None:
                    first_obs = rule
                continue
            observed = (observe_only or policies.observe_only) and rule.action != "allow"
            return Decision(rule.action, rule.name, _message(rule), observed,
                            rule.approval, tuple(observations))
    if first_obs is not None:
        return Decision(first_obs.action, first_obs.name, _message(first_obs), True,
                        first_obs.approval, tuple(observations))
    return Decision("allow", DEFAULT_RULE, "", False)


def _message(rule: PolicyRule) -> str:
    if rule.message:
        return rule.message
    if rule.action == "block":
        return DEFAULT_BLOCK_MESSAGE
    if rule.action == "approve":
        return "request held for approval"
    return ""

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

import datetime
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from addons.frame.flowbody import parse_json

ACTIONS = ("allow", "block", "approve", "observe")
DEFAULT_RULE = "<default>"
DEFAULT_BLOCK_MESSAGE = "request blocked by policy"


class BodyUnavailable(Exception):
    """A rule needs the request body, but it cannot be read (bad encoding, streamed)."""


# ---------------------------------------------------------------- request facts
_UNSET: Any = object()


class RequestFacts:
    """What rules can look at, computed on first use and then cached.

    `body` is the decoded request body (bytes), None for no body, or a callable returning
    it (so an addon can defer decoding until a rule needs it). `json_loader`, if given,
    returns the parsed JSON body (None when the body is not JSON): addons share one
    parse per flow through it (addons/frame/flowbody.py).
    """

    def __init__(self, method: str = "GET", host: str = "", path: str = "/", *,
                 upstream: str | None = None, identity: dict[str, Any] | None = None,
                 body: bytes | None | Callable[[], bytes | None] = None,
                 json_loader: Callable[[], Any] | None = None,
                 now: float | None = None) -> None:
        self.method = method.upper()
        self.host = host.lower().rstrip(".")
        self.path = normalize_path(path)
        self.upstream = upstream
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
        self._body_src = body
        self._json_loader = json_loader
        self._body: Any = _UNSET
        self._json: Any = _UNSET
        self._prompt: str | None = None
        self._folded: str | None = None
        self._tools: frozenset[str] | None = None
        self._local: dict[str, datetime.datetime] = {}

    # -- body
    @property
    def body(self) -> bytes:
        if self._body is _UNSET:
            src = self._body_src
            try:
                value = src() if callable(src) else src
            except BodyUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. ValueError on a bad content-encoding
                raise BodyUnavailable(f"cannot decode the request body ({type(e).__name__})") \
                    from None
            self._body = value or b""
        return self._body

    @property
    def body_size(self) -> int:
        return len(self.body)

    @property
    def json(self) -> Any:
        """The parsed JSON body, or None when the body is empty or not JSON."""
        if self._json is _UNSET:
            if self._json_loader is not None:
                try:
                    self._json = self._json_loader()
                except BodyUnavailable:
                    raise
                except Exception as e:  # noqa: BLE001 - decoding failed
                    raise BodyUnavailable(
                        f"cannot decode the request body ({type(e).__name__})") from None
            else:
                self._json = parse_json(self.body)
        return self._json

    @property
    def model(self) -> str | None:
        j = self.json
        m = j.get("model") if isinstance(j, dict) else None
        return m if isinstance(m, str) else None

    @property
    def prompt_text(self) -> str:
        if self._prompt is None:
            j = self.json
            if j is None:
                self._prompt = self.body.decode("utf-8", "replace")
            else:
                self._prompt = "\n\n".join(prompt_texts(j))
        return self._prompt

    @property
    def prompt_folded(self) -> str:
        """The prompt text case-folded exactly as `re.IGNORECASE` compares characters."""
        if self._folded is None:
            self._folded = fold(self.prompt_text)
        return self._folded

    @property
    def tool_names(self) -> frozenset[str]:
        if self._tools is None:
            j = self.json
            self._tools = frozenset(tool_names(j)) if isinstance(j, dict) else frozenset()
        return self._tools

    def local_time(self, tz: datetime.tzinfo, key: str) -> datetime.datetime:
        t = self._local.get(key)
        if t is None:
            t = self._local[key] = datetime.datetime.fromtimestamp(self.now, tz)
        return t


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


def tool_names(body: dict[str, Any]) -> set[str]:
    """Names of tools defined in the request and tools called in its history."""
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
    items: list[Any] = []
    for key in ("messages", "input"):
        v = body.get(key)
        if isinstance(v, list):
            items.extend(v)
    for m in items:
        if not isinstance(m, dict):
            continue
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
    return names


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


def compare(op: str, value: Any, ref: Any) -> bool:
    """`value OP ref` for one field value; ordering needs two numbers."""
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


def prompt_test(pattern: re.Pattern[str]) -> Check:
    """Search the prompt text, behind a literal prefilter when the pattern has one.

    Python's `re` tries a pattern that starts with `\\b` or a look-behind at every
    position of the text (~100 µs for 2 KB); a substring test for a literal that every
    match must contain costs ~1 µs, so with many prompt rules almost all searches are
    skipped. The prefilter is sound: it only skips a search that cannot match.
    """
    lits = required_literals(pattern)
    if not lits:
        return lambda f: pattern.search(f.prompt_text) is not None

    def check(f: RequestFacts) -> bool:
        folded = f.prompt_folded
        for lit in lits:
            if lit in folded:
                return pattern.search(f.prompt_text) is not None
        return False
    return check


def any_prompt_test(patterns: tuple[re.Pattern[str], ...]) -> Check:
    """True when any of the patterns matches the prompt (each behind its own prefilter)."""
    checks = tuple(prompt_test(p) for p in patterns)
    if len(checks) == 1:
        return checks[0]
    return lambda f: any(c(f) for c in checks)


# ---------------------------------------------------------------- literal prefilter
try:  # the exact case folding of `re` (simple lower-casing plus its extra equivalences)
    from _sre import unicode_tolower as _tolower
    from re import _constants as _sre_c
    from re import _parser as _sre_parse
    from re._casefix import _EXTRA_CASES
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


def evaluate(policies: PolicySet, facts: RequestFacts, *,
             observe_only: bool = False) -> Decision:
    """The decision for one request (see the module docstring for the order).

    Raises BodyUnavailable when a rule needs a body that cannot be read: the caller
    refuses the request rather than guess (fail closed).
    """
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

"""Parse the `policies` list of the rules into compiled rules (addons/policy/engine.py).

Everything a rule needs at request time is compiled here, once per load: globs become one
regex per list, prompt patterns and word lists one combined regex per rule, time zones are
resolved, and upstream names are checked against the declared upstreams. Every error names
the file, the key path (e.g. `policies[3].match.fields.n`) and the reason.
"""

from __future__ import annotations

import re
import zoneinfo
from typing import Any

import yaml

from addons.config.schema import (
    ConfigError,
    Where,
    expect_bool,
    expect_int,
    expect_map,
    expect_number,
    expect_str,
    expect_str_list,
)
from addons.egress.config import Upstream
from addons.policy.engine import (
    ACTIONS,
    ApprovalSpec,
    Condition,
    FieldTest,
    Match,
    PolicyRule,
    PolicySet,
    TimeWindow,
    any_prompt_test,
    glob_any,
    provider_tools_test,
    size_test,
    tokens_test,
    tools_test,
)
from addons.policy.skeleton import normalize, skeleton, skeleton_pattern

RULE_KEYS = {"name", "description", "match", "action", "message", "observe",
             "approvers", "min_approvals", "timeout", "on_timeout", "allow_mitmweb"}
APPROVAL_KEYS = {"approvers", "min_approvals", "timeout", "on_timeout", "allow_mitmweb"}
MATCH_KEYS = {"sub", "iss", "groups", "roles", "authenticated", "upstream", "host", "method",
              "path", "model", "fields", "prompt", "tools", "body_size", "time", "not", "any",
              "output_tokens", "provider_tools", "mcp"}
MCP_MATCH_KEYS = {"method", "tool", "resource", "prompt"}
SETTINGS_KEYS = {"mode"}
MODES = ("enforce", "observe_only")
COMPARE_OPS = (">=", "<=", "!=", "==", ">", "<")
FIELD_MAP_OPS = {*COMPARE_OPS, "in", "not_in", "matches", "present"}
DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
              "kib": 1024, "mib": 1024**2, "gib": 1024**3, "k": 1024, "m": 1024**2}
MAX_TIMEOUT = 7 * 24 * 3600

# cost classes: identity/route facts are free, time is cheap, body facts need a JSON parse,
# prompt text extraction and regex search are the most expensive.
COST_ROUTE, COST_TIME, COST_JSON, COST_TOOLS, COST_PROMPT = 0, 1, 2, 3, 4


def parse_policies(items: list[tuple[Any, Where]],
                   upstreams: tuple[Upstream, ...]) -> PolicySet:
    rules: list[PolicyRule] = []
    names: dict[str, Where] = {}
    mode: tuple[str, Where] | None = None
    upstream_names = {u.name for u in upstreams}
    for raw, where in items:
        if isinstance(raw, dict) and "mode" in raw and "name" not in raw:
            d = expect_map(raw, where, SETTINGS_KEYS)
            value = expect_str(d["mode"], where.child("mode"))
            if value not in MODES:
                raise where.child("mode").error(f"must be one of {', '.join(MODES)}, "
                                                f"got {value!r}")
            if mode is not None:
                raise where.child("mode").error(
                    f"mode is already set at {mode[1].file}: {mode[1].key}")
            mode = (value, where)
            continue
        rule = parse_rule(raw, where, upstream_names)
        if rule.name in names:
            first = names[rule.name]
            raise where.child("name").error(
                f"policy {rule.name!r} is already defined at {first.file}: {first.key}")
        names[rule.name] = where
        rules.append(rule)
    return PolicySet(tuple(rules), observe_only=mode is not None and mode[0] == "observe_only")


def parse_rule(raw: Any, where: Where, upstream_names: set[str]) -> PolicyRule:
    d = expect_map(raw, where, RULE_KEYS, required=("name", "action"))
    name = expect_str(d["name"], where.child("name"))
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", name) or name.startswith("<"):
        raise where.child("name").error("use letters, digits, '.', ':', '_' or '-'")
    if "description" in d:
        expect_str(d["description"], where.child("description"), nonempty=False)
    action = expect_str(d["action"], where.child("action"))
    if action not in ACTIONS:
        raise where.child("action").error(f"must be one of {', '.join(ACTIONS)}, got {action!r}")
    message = expect_str(d.get("message", ""), where.child("message"), nonempty=False)
    observe = expect_bool(d.get("observe", False), where.child("observe"))
    approval = None
    if action == "approve":
        approval = parse_approval(d, where)
    else:
        extra = sorted(APPROVAL_KEYS & set(d))
        if extra:
            raise where.child(extra[0]).error("only allowed with action: approve")
    match = parse_match(d.get("match"), where.child("match"), upstream_names)
    return PolicyRule(name=name, match=match, action=action, message=message, observe=observe,
                      approval=approval, where=f"{where.file}: {where.key}")


def parse_approval(d: dict[str, Any], where: Where) -> ApprovalSpec:
    groups = expect_str_list(d.get("approvers", []), where.child("approvers"))
    allow_mitmweb = expect_bool(d.get("allow_mitmweb", False), where.child("allow_mitmweb"))
    if not groups and not allow_mitmweb:
        raise where.child("approvers").error(
            "an approve rule needs approver groups (or allow_mitmweb: true); "
            "otherwise nobody could ever approve")
    min_approvals = expect_int(d.get("min_approvals", 1), where.child("min_approvals"),
                               minimum=1, maximum=100)
    timeout = None
    if d.get("timeout") is not None:
        timeout = expect_number(d["timeout"], where.child("timeout"), minimum=0.01,
                                maximum=MAX_TIMEOUT)
    on_timeout = None
    if d.get("on_timeout") is not None:
        on_timeout = expect_str(d["on_timeout"], where.child("on_timeout"))
        if on_timeout not in ("deny", "allow"):
            raise where.child("on_timeout").error(f"must be deny or allow, got {on_timeout!r}")
    return ApprovalSpec(groups=groups, min_approvals=min_approvals, timeout=timeout,
                        on_timeout=on_timeout, allow_mitmweb=allow_mitmweb)


# ---------------------------------------------------------------- match
def parse_match(raw: Any, where: Where, upstream_names: set[str]) -> Match:
    d = expect_map(raw, where, MATCH_KEYS)
    conds: list[Condition] = []

    def add(key: str, check: Any, cost: int = COST_ROUTE) -> None:
        conds.append(Condition(key, check, cost))

    for key in ("sub", "iss"):
        if key in d:
            ok = glob_any(_nonempty_list(d[key], where.child(key)), lower=False)
            add(key, (lambda f, ok=ok, k=key: ok(getattr(f, k))))
    for key in ("groups", "roles"):
        if key in d:
            wanted = frozenset(_nonempty_list(d[key], where.child(key)))
            add(key, (lambda f, w=wanted, k=key: not w.isdisjoint(getattr(f, k))))
    if "authenticated" in d:
        want = expect_bool(d["authenticated"], where.child("authenticated"))
        add("authenticated", lambda f, w=want: f.authenticated is w)
    if "upstream" in d:
        names = _nonempty_list(d["upstream"], where.child("upstream"))
        for i, n in enumerate(names):
            if n not in upstream_names:
                known = ", ".join(sorted(upstream_names)) or "none declared"
                raise where.child("upstream").child(i).error(
                    f"no upstream named {n!r} (declared: {known})")
        wanted = frozenset(names)
        add("upstream", lambda f, w=wanted: f.upstream in w)
    if "host" in d:
        ok = glob_any(_nonempty_list(d["host"], where.child("host")))
        add("host", lambda f, ok=ok: ok(f.host))
    if "method" in d:
        methods = frozenset(m.upper() for m in _nonempty_list(d["method"], where.child("method")))
        add("method", lambda f, m=methods: f.method in m)
    if "path" in d:
        add("path", _path_check(d["path"], where.child("path")))
    if "model" in d:
        ok = glob_any(_nonempty_list(d["model"], where.child("model")))
        add("model", lambda f, ok=ok: (m := f.model) is not None and ok(m), COST_JSON)
    if "body_size" in d:
        ops = _size_ops(d["body_size"], where.child("body_size"))
        add("body_size", size_test(ops), COST_JSON)
    if "fields" in d:
        fw = where.child("fields")
        fields = expect_map(d["fields"], fw)
        if not fields:
            raise fw.error("must name at least one field")
        for path, spec in fields.items():
            add(f"fields.{path}", _field_test(path, spec, fw.child(path)), COST_JSON)
    if "output_tokens" in d:
        ft = _field_test("output_tokens", d["output_tokens"], where.child("output_tokens"))
        if ft.present is not None or not ft.ops or any(
                op not in COMPARE_OPS or isinstance(ref, bool) or
                not isinstance(ref, int | float) for op, ref in ft.ops):
            raise where.child("output_tokens").error(
                "expected numeric comparisons like '> 4096'")
        add("output_tokens", tokens_test(ft.ops), COST_JSON)
    if "provider_tools" in d:
        add("provider_tools", _provider_tools(d["provider_tools"],
                                              where.child("provider_tools")), COST_TOOLS)
    if "mcp" in d:
        add("mcp", _mcp_check(d["mcp"], where.child("mcp")), COST_JSON)
    if "time" in d:
        add("time", _time_window(d["time"], where.child("time")), COST_TIME)
    if "tools" in d:
        ok = glob_any(_nonempty_list(d["tools"], where.child("tools")), lower=False)
        add("tools", tools_test(ok), COST_TOOLS)
    if "prompt" in d:
        add("prompt", any_prompt_test(_prompt_patterns(d["prompt"], where.child("prompt"))),
            COST_PROMPT)
    if "not" in d:
        inner = parse_match(d["not"], where.child("not"), upstream_names)
        if not inner.conditions:
            raise where.child("not").error("must hold at least one condition")
        add("not", lambda f, m=inner: not m(f), inner.cost)
    if "any" in d:
        aw = where.child("any")
        if not isinstance(d["any"], list) or not d["any"]:
            raise aw.error("expected a non-empty list of match mappings")
        alts = tuple(parse_match(m, aw.child(i), upstream_names)
                     for i, m in enumerate(d["any"]))
        add("any", lambda f, a=alts: any(m(f) for m in a), max(m.cost for m in alts))
    # cheap first; sorted() is stable, so equal costs keep the written order
    return Match(tuple(sorted(conds, key=lambda c: c.cost)))


def _mcp_check(value: Any, where: Where) -> Any:
    """`mcp: {method, tool, resource, prompt}` (globs; all given must hold) on a request to
    an `mcp` upstream: `tool` is the name a `tools/call` calls, `resource` the URI a
    `resources/read` reads, `prompt` the name a `prompts/get` gets. Tool names and URIs are
    compared case-sensitively (servers treat them so); methods too."""
    d = expect_map(value, where, MCP_MATCH_KEYS)
    if not d:
        raise where.error("give method, tool, resource and/or prompt")
    tests = tuple((_MCP_FACTS[key], glob_any(_nonempty_list(d[key], where.child(key)),
                                             lower=False))
                  for key in ("method", "tool", "resource", "prompt") if key in d)

    def check(f: Any) -> bool:
        m = f.mcp
        if m is None:
            return False
        for get, ok in tests:
            v = get(m)
            if type(v) is not str or not ok(v):
                return False
        return True
    return check


_MCP_FACTS = {"method": lambda m: m.method, "tool": lambda m: m.tool,
              "resource": lambda m: m.uri, "prompt": lambda m: m.prompt}


PROVIDER_TOOLS_KEYS = {"type", "server_url", "not_server_url", "tools", "not_tools",
                       "require_approval"}


def _provider_tools(value: Any, where: Where) -> Any:
    """`provider_tools: [web_search*, mcp]` (type globs) or a mapping whose tests must all
    hold for the same tool: `type`, `server_url` / `not_server_url` (URL globs, matched on
    the normalized URL, case-insensitive), `tools` (some exposed tool name matches,
    case-insensitive) / `not_tools` (some exposed tool is not in this list, case-sensitive:
    tool names are), `require_approval` (always|never globs)."""
    if isinstance(value, dict):
        d = expect_map(value, where, PROVIDER_TOOLS_KEYS)
        if not d:
            raise where.error(f"give one or more of {', '.join(sorted(PROVIDER_TOOLS_KEYS))}")

        def globs(key: str, lower: bool = True) -> Any:
            return glob_any(_nonempty_list(d[key], where.child(key)), lower=lower) \
                if key in d else None
        return provider_tools_test(globs("type"), globs("server_url"),
                                   not_urls=globs("not_server_url"), tools=globs("tools"),
                                   not_tools=globs("not_tools", lower=False),
                                   approval=globs("require_approval"))
    return provider_tools_test(glob_any(_nonempty_list(value, where)), None)

def _nonempty_list(value: Any, where: Where) -> tuple[str, ...]:
    out = expect_str_list(value, where)
    if not out:
        raise where.error("must not be an empty list")
    return out


def _path_check(value: Any, where: Where) -> Any:
    globs: tuple[str, ...] = ()
    regexes: list[re.Pattern[str]] = []
    if isinstance(value, dict):
        d = expect_map(value, where, {"glob", "regex"})
        if not d:
            raise where.error("give glob and/or regex")
        if "glob" in d:
            globs = _nonempty_list(d["glob"], where.child("glob"))
        for i, r in enumerate(_nonempty_list(d["regex"], where.child("regex"))
                              if "regex" in d else ()):
            regexes.append(_compile(r, where.child("regex").child(i)))
    else:
        globs = _nonempty_list(value, where)
    glob_ok = glob_any(globs, lower=False) if globs else None
    rx = re.compile("|".join(f"(?:{r.pattern})" for r in regexes)) if regexes else None

    def check(f: Any) -> bool:
        return bool((glob_ok and glob_ok(f.path)) or (rx and rx.search(f.path)))
    return check


def _compile(text: str, where: Where, flags: int = 0) -> re.Pattern[str]:
    try:
        return re.compile(text, flags)
    except re.error as e:
        raise where.error(f"invalid regular expression: {e}") from None


def _prompt_patterns(value: Any, where: Where) -> tuple[tuple[re.Pattern[str], str], ...]:
    """(pattern, text) pairs: one per regex plus one for the words, kept apart (not one
    alternation) so that each gets its own literal prefilter — one branch without a
    literal would otherwise make every search scan the whole prompt (3.9 ms -> 1.7 ms on
    100 KB).

    What is searched (addons/policy/skeleton.py): words are compared on the skeleton
    (normalised, case folded, confusables mapped; the words go through the same
    skeleton); a regex is searched in the text as sent and, with its literal characters
    mapped the same way, in the skeleton. With `ignore_case: false` the normalised text
    (case kept, confusables not mapped) takes the skeleton's place."""
    d = expect_map(value, where, {"regex", "words", "ignore_case"})
    ignore_case = expect_bool(d.get("ignore_case", True), where.child("ignore_case"))
    flags = re.IGNORECASE if ignore_case else 0
    out: list[tuple[re.Pattern[str], str]] = []
    for i, r in enumerate(expect_str_list(d.get("regex", []), where.child("regex"))):
        rx = _compile(r, where.child("regex").child(i), flags)
        out.append((rx, "prompt_text"))
        mapped = skeleton_pattern(r, skeleton if ignore_case else normalize)
        try:
            out.append((re.compile(mapped, flags), "skel_text" if ignore_case else "norm_text"))
        except re.error:
            pass  # a literal mapped into something `re` refuses: the text as sent still counts
    words = expect_str_list(d.get("words", []), where.child("words"))
    if words:
        form = skeleton if ignore_case else normalize
        alts = "|".join(r"\s+".join(re.escape(w) for w in form(word).split())
                        for word in words if form(word).split())
        if not alts:
            raise where.child("words").error("words must not be blank")
        # whole words: no word character directly before or after
        out.append((_compile(rf"(?<!\w)(?:{alts})(?!\w)", where, flags),
                    "skel_text" if ignore_case else "norm_text"))
    if not out:
        raise where.error("give regex and/or words")
    return tuple(out)


def _scalar(text: str) -> Any:
    """The value after an operator: a number, true/false/null, or a (quoted) string."""
    text = text.strip()
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if v is None and text.lower() not in ("null", "~"):
        return text
    return v if isinstance(v, str | int | float | bool) or v is None else text


def _op_string(text: str, where: Where) -> tuple[str, Any]:
    s = text.strip()
    for op in COMPARE_OPS:
        if s.startswith(op):
            rest = s[len(op):].strip()
            if not rest or rest[0] in "<>=!":
                raise where.error(f"expected an operator (> >= < <= == !=) and a value, "
                                  f"got {text!r}")
            return op, _scalar(rest)
    raise where.error(f"expected an operator (> >= < <= == !=) and a value, got {text!r}")


def _field_test(path: str, spec: Any, where: Where) -> FieldTest:
    segs = tuple(path.split("."))
    if not all(segs):
        raise where.error(f"not a dotted path: {path!r}")
    if isinstance(spec, str) and spec.strip() in ("present", "absent"):
        return FieldTest(segs, spec.strip() == "present")
    ops: list[tuple[str, Any]] = []
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise where.error("must not be an empty list")
    for i, s in enumerate(specs):
        w = where.child(i) if isinstance(spec, list) else where
        if isinstance(s, str):
            if s.strip()[:1] in ("<", ">", "=", "!"):
                ops.append(_op_string(s, w))
            else:
                ops.append(("==", s))
        elif isinstance(s, bool | int | float) or s is None:
            ops.append(("==", s))
        elif isinstance(s, dict):
            m = expect_map(s, w, FIELD_MAP_OPS)
            if not m:
                raise w.error("must hold an operator")
            if "present" in m:
                if len(m) > 1:
                    raise w.child("present").error("cannot be combined with comparisons")
                return FieldTest(segs, expect_bool(m["present"], w.child("present")))
            for op, ref in m.items():
                ow = w.child(op)
                if op in ("in", "not_in"):
                    if not isinstance(ref, list) or not ref:
                        raise ow.error("expected a non-empty list of values")
                    ops.append((op, tuple(ref)))
                elif op == "matches":
                    ops.append((op, _compile(expect_str(ref, ow), ow)))
                elif op in (">", ">=", "<", "<=") and (
                        isinstance(ref, bool) or not isinstance(ref, int | float)):
                    raise ow.error(f"expected a number, got {ref!r}")
                else:
                    ops.append((op, ref))
        else:
            raise w.error(f"expected 'OP value', present, absent or a mapping, got {s!r}")
    return FieldTest(segs, None, tuple(ops))


def _size(text: Any, where: Where) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise where.error(f"expected a size like 1000, 64KiB or 1MB, got {text!r}")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def _size_ops(value: Any, where: Where) -> tuple[tuple[str, int], ...]:
    specs = value if isinstance(value, list) else [value]
    ops: list[tuple[str, int]] = []
    for i, s in enumerate(specs):
        w = where.child(i) if isinstance(value, list) else where
        if isinstance(s, dict):
            for op, ref in expect_map(s, w, set(COMPARE_OPS)).items():
                ops.append((op, _size(ref, w.child(op))))
            continue
        if not isinstance(s, str):
            raise w.error(f"expected a comparison like '> 1MB', got {s!r}")
        st = s.strip()
        op = next((o for o in COMPARE_OPS if st.startswith(o)), None)
        if op is None:
            raise w.error(f"expected a comparison like '> 1MB', got {s!r}")
        ops.append((op, _size(st[len(op):], w)))
    if not ops:
        raise where.error("must hold a comparison")
    return tuple(ops)


def _hhmm(text: str, where: Where) -> int:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59 or \
            (int(m.group(1)) == 24 and int(m.group(2)) != 0):
        raise where.error(f"expected HH:MM, got {text!r}")
    return int(m.group(1)) * 60 + int(m.group(2))


def _time_window(value: Any, where: Where) -> TimeWindow:
    d = expect_map(value, where, {"between", "tz", "days"})
    if not d:
        raise where.error("give between and/or days")
    tz_name = expect_str(d.get("tz", "UTC"), where.child("tz"))
    try:
        tz = zoneinfo.ZoneInfo(tz_name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise where.child("tz").error(f"unknown time zone {tz_name!r}") from None
    start = end = None
    if "between" in d:
        bw = where.child("between")
        text = expect_str(d["between"], bw)
        if text.count("-") != 1:
            raise bw.error(f"expected 'HH:MM-HH:MM', got {text!r}")
        a, b = text.split("-")
        start, end = _hhmm(a, bw), _hhmm(b, bw)
        if start == end:
            raise bw.error("start and end are equal; leave 'between' out for the whole day")
    days: set[int] = set()
    for i, day in enumerate(expect_str_list(d.get("days", []), where.child("days"))):
        key = day.strip().lower()[:3]
        if key not in DAYS:
            raise where.child("days").child(i).error(
                f"expected mon, tue, wed, thu, fri, sat or sun, got {day!r}")
        days.add(DAYS[key])
    return TimeWindow(tz=tz, tz_name=tz_name, start=start, end=end, days=frozenset(days))


__all__ = ["ConfigError", "parse_policies"]

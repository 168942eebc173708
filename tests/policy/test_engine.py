"""Policy rules: parsing (errors name file, key, reason), facts, matching and evaluation order."""

from __future__ import annotations

import datetime
import json
import textwrap
from pathlib import Path

import pytest

from addons.config.loader import load_rules
from addons.config.schema import ConfigError, Where
from addons.policy.config import parse_policies
from addons.policy.engine import (
    DEFAULT_RULE,
    BodyUnavailable,
    RequestFacts,
    evaluate,
    prompt_texts,
    resolve_path,
    tool_names,
)

UPSTREAMS = """\
upstreams:
  - {name: openai, hosts: [api.openai.com], dialect: openai}
  - {name: anthropic, hosts: [api.anthropic.com], dialect: anthropic}
"""


def policies(yaml_text: str, tmp_path: Path):
    (tmp_path / "a.yaml").write_text(UPSTREAMS)
    (tmp_path / "b.yaml").write_text(textwrap.dedent(yaml_text))
    return load_rules(tmp_path).policies


def bad(yaml_text: str, tmp_path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        policies(yaml_text, tmp_path)
    return ei.value


def facts(body=None, *, method="POST", host="api.openai.com", path="/v1/chat/completions",
          upstream="openai", identity=None, now=None) -> RequestFacts:
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return RequestFacts(method, host, path, upstream=upstream, identity=identity, body=raw,
                        now=now)


def decide(ps, **kw):
    return evaluate(ps, facts(**kw))


# ---------------------------------------------------------------- parsing errors
@pytest.mark.parametrize("text,key,reason", [
    ("policies:\n  - {name: a, action: nuke}", "policies[0].action", "must be one of"),
    ("policies:\n  - {action: block}", "policies[0].name", "required"),
    ("policies:\n  - {name: a, action: block, match: {colour: red}}",
     "policies[0].match.colour", "unknown key"),
    ("policies:\n  - {name: a, action: block, match: {upstream: [nope]}}",
     "policies[0].match.upstream[0]", "no upstream named 'nope'"),
    ("policies:\n  - {name: a, action: block}\n  - {name: a, action: allow}",
     "policies[1].name", "already defined"),
    ("policies:\n  - {name: a, action: block, match: {prompt: {regex: ['(']}}}",
     "policies[0].match.prompt.regex[0]", "invalid regular expression"),
    ("policies:\n  - {name: a, action: block, match: {fields: {n: '>> 3'}}}",
     "policies[0].match.fields.n", "expected an operator"),
    ("policies:\n  - {name: a, action: block, match: {fields: {n: {'>': x}}}}",
     "policies[0].match.fields.n.>", "expected a number"),
    ("policies:\n  - {name: a, action: block, match: {time: {tz: Mars/Base}}}",
     "policies[0].match.time.tz", "unknown time zone"),
    ("policies:\n  - {name: a, action: block, match: {time: {between: '9-17'}}}",
     "policies[0].match.time.between", "HH:MM"),
    ("policies:\n  - {name: a, action: block, match: {time: {days: [funday]}}}",
     "policies[0].match.time.days[0]", "expected mon"),
    ("policies:\n  - {name: a, action: block, match: {body_size: 'big'}}",
     "policies[0].match.body_size", "comparison"),
    ("policies:\n  - {name: a, action: approve}", "policies[0].approvers", "nobody could"),
    ("policies:\n  - {name: a, action: approve, approvers: [x], on_timeout: maybe}",
     "policies[0].on_timeout", "deny or allow"),
    ("policies:\n  - {name: a, action: approve, approvers: [x], timeout: 0}",
     "policies[0].timeout", ">= 0.01"),
    ("policies:\n  - {name: a, action: approve, approvers: [x], min_approvals: 0}",
     "policies[0].min_approvals", ">= 1"),
    ("policies:\n  - {name: a, action: block, approvers: [x]}",
     "policies[0].approvers", "only allowed with action: approve"),
    ("policies:\n  - {mode: observe_only}\n  - {mode: enforce}", "policies[1].mode",
     "already set"),
    ("policies:\n  - {mode: loud}", "policies[0].mode", "must be one of"),
    ("policies:\n  - {name: '<default>', action: allow}", "policies[0].name", "use letters"),
    ("policies:\n  - {name: a, action: block, match: {model: []}}", "policies[0].match.model",
     "empty"),
])
def test_errors_name_file_key_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    e = bad(text, tmp_path)
    assert e.file.endswith("b.yaml")
    assert e.key == key, str(e)
    assert reason in e.reason, str(e)


def test_duplicate_name_across_files_names_first_place(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("policies:\n  - {name: dup, action: allow}\n")
    e = bad("policies:\n  - {name: dup, action: block}\n", tmp_path)
    assert e.file.endswith("c.yaml") and "b.yaml: policies[0]" in e.reason


def test_describe_and_defaults(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - {mode: observe_only}
          - {name: a, action: block}
          - {name: b, action: approve, approvers: [rev]}
          - {name: c, action: observe}
        """, tmp_path)
    assert ps.observe_only
    assert ps.describe() == "3 rules (1 block, 1 approve, 1 observe); mode observe_only"
    spec = ps.rules[1].approval
    assert (spec.groups, spec.min_approvals, spec.timeout, spec.on_timeout,
            spec.allow_mitmweb) == (("rev",), 1, None, None, False)
    assert parse_policies([], ()).describe() == "0 rules"


# ---------------------------------------------------------------- evaluation order
def test_first_match_wins_and_default_allows(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - {name: allow-admins, match: {groups: [admins]}, action: allow}
          - {name: no-gpt5, match: {model: "gpt-5*"}, action: block, message: not for you}
          - {name: everything, action: block}
        """, tmp_path)
    d = decide(ps, body={"model": "gpt-5-pro"}, identity={"sub": "u", "groups": ["admins"]})
    assert (d.action, d.rule) == ("allow", "allow-admins")
    d = decide(ps, body={"model": "GPT-5-pro"}, identity={"sub": "u", "groups": ["devs"]})
    assert (d.action, d.rule, d.message) == ("block", "no-gpt5", "not for you")
    d = decide(ps, body={"model": "gpt-4o"})
    assert (d.action, d.rule) == ("block", "everything")
    empty = policies("policies: []\n", tmp_path)
    d = decide(empty, body={"model": "gpt-4o"})
    assert (d.action, d.rule, d.observed) == ("allow", DEFAULT_RULE, False)


def test_observe_rules_record_and_never_change_enforcement(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - {name: watch, match: {model: "gpt-*"}, action: observe}
          - {name: trial-block, match: {model: "gpt-4*"}, action: block, observe: true,
             message: would block}
          - {name: real-block, match: {model: "gpt-4o"}, action: block}
        """, tmp_path)
    d = decide(ps, body={"model": "gpt-4o"})
    assert (d.action, d.rule, d.observed) == ("block", "real-block", False)
    assert d.to_metadata()["observations"] == [
        {"rule": "watch", "action": "observe"}, {"rule": "trial-block", "action": "block"}]
    d = decide(ps, body={"model": "gpt-4-turbo"})
    # no enforcing rule matched: the first observation is the (observed) decision
    assert (d.action, d.rule, d.observed, d.enforced_action) == \
        ("observe", "watch", True, "allow")
    d = decide(ps, body={"model": "claude"})
    assert d.rule == DEFAULT_RULE and not d.observations


def test_global_observe_only(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - {name: blk, match: {model: x}, action: block}
          - {name: hold, match: {model: y}, action: approve, approvers: [r]}
          - {name: ok, match: {model: z}, action: allow}
        """, tmp_path)
    for model, action in (("x", "block"), ("y", "approve"), ("z", "allow")):
        d = evaluate(ps, facts({"model": model}), observe_only=True)
        assert d.action == action
        assert d.observed is (action != "allow")
        assert d.enforced_action == "allow"
        assert "approval" not in d.to_metadata()
    enforced = evaluate(ps, facts({"model": "y"})).to_metadata()
    # timeout / on_timeout unset: the approvals section's defaults apply
    assert enforced["approval"] == {"groups": ["r"], "min_approvals": 1, "timeout": None,
                                    "on_timeout": None, "allow_mitmweb": False}
    mode = policies("policies:\n  - {mode: observe_only}\n"
                    "  - {name: blk, action: block}\n", tmp_path)
    d = decide(mode, body={})
    assert (d.action, d.observed) == ("block", True)


# ---------------------------------------------------------------- conditions
def test_identity_route_and_path_conditions(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - name: r
            action: block
            match:
              sub: ["svc-*"]
              iss: [https://idp.example]
              roles: [writer]
              upstream: [openai]
              host: ["*.openai.com"]
              method: [post]
              path: {glob: ["/v1/chat/*"], regex: ['^/v2/']}
        """, tmp_path)
    ident = {"sub": "svc-a", "iss": "https://idp.example", "roles": ["writer"], "groups": []}
    assert decide(ps, identity=ident).rule == "r"
    assert decide(ps, identity=ident, path="/v2/x?y=1").rule == "r"
    for change in ({"identity": {**ident, "sub": "human"}},
                   {"identity": {**ident, "iss": "https://other"}},
                   {"identity": {**ident, "roles": ["reader"]}},
                   {"identity": None},
                   {"identity": ident, "upstream": "anthropic"},
                   {"identity": ident, "host": "evil.com"},
                   {"identity": ident, "method": "GET"},
                   {"identity": ident, "path": "/v1/embeddings"}):
        assert decide(ps, **change).rule == DEFAULT_RULE, change


def test_authenticated_not_and_any(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - {name: anon, match: {authenticated: false}, action: block}
          - name: either
            action: block
            match:
              any: [{model: a}, {fields: {n: "> 5"}}]
              not: {groups: [vip]}
        """, tmp_path)
    assert decide(ps, body={}).rule == "anon"
    user = {"sub": "u", "groups": ["g"]}
    vip = {"sub": "u", "groups": ["vip"]}
    assert decide(ps, body={"model": "a"}, identity=user).rule == "either"
    assert decide(ps, body={"n": 6}, identity=user).rule == "either"
    assert decide(ps, body={"n": 5}, identity=user).rule == DEFAULT_RULE
    assert decide(ps, body={"model": "a"}, identity=vip).rule == DEFAULT_RULE


@pytest.mark.parametrize("spec,body,hit", [
    ('"> 10"', {"n": 11}, True),
    ('"> 10"', {"n": 10}, False),
    ('"> 10"', {"n": "11"}, True),           # a numeric string is its number
    ('"> 10"', {"n": " 1e3 "}, True),
    ('"> 10"', {"n": True}, "refuse"),       # a bool is not a number: refused
    ('"> 10"', {"n": "eleven"}, "refuse"),   # never silently not matching
    ('"> 10"', {"n": "NaN"}, "refuse"),
    ('"> 10"', {"n": [11]}, "refuse"),
    ('"> 10"', {"n": {"x": 11}}, "refuse"),
    ('"== 3"', {"n": "3"}, True),
    ('">= 8000"', {"n": 8000.0}, True),
    ('"< 0.5"', {"n": 0.2}, True),
    ('"<= 2"', {"n": 3}, False),
    ('"== gold"', {"n": "gold"}, True),
    ('"== 3"', {"n": 3.0}, True),
    ('"== true"', {"n": True}, True),
    ('"== true"', {"n": 1}, False),
    ('"!= gold"', {"n": "silver"}, True),
    ('"!= gold"', {}, False),                # comparisons need the field
    ("present", {"n": None}, True),
    ("present", {}, False),
    ("absent", {}, True),
    ("absent", {"n": 0}, False),
    ("true", {"n": True}, True),
    ("{in: [a, b]}", {"n": "b"}, True),
    ("{not_in: [a, b]}", {"n": "c"}, True),
    ("{matches: '^gpt-'}", {"n": "gpt-4"}, True),
    ('{">": 1, "<": 5}', {"n": 3}, True),
    ('{">": 1, "<": 5}', {"n": 7}, False),
    ('[">= 2", "<= 4"]', {"n": 4}, True),
    ("{present: false}", {"n": 1}, False),
])
def test_field_comparisons(tmp_path: Path, spec: str, body: dict, hit: bool) -> None:
    ps = policies(f"policies:\n  - {{name: f, action: block, match: {{fields: {{n: {spec}}}}}}}\n",
                  tmp_path)
    if hit == "refuse":
        with pytest.raises(BodyUnavailable):
            decide(ps, body=body)
        return
    assert (decide(ps, body=body).rule == "f") is hit


def test_dotted_paths_and_wildcards(tmp_path: Path) -> None:
    doc = {"a": {"b": [{"c": 1}, {"c": 20}]}, "messages": [{"role": "user"}, {"role": "tool"}]}
    assert resolve_path(doc, ("a", "b", "*", "c")) == [1, 20]
    assert resolve_path(doc, ("a", "b", "1", "c")) == [20]
    assert resolve_path(doc, ("a", "b", "-1", "c")) == [20]
    assert resolve_path(doc, ("messages", "role")) == ["user", "tool"]
    assert resolve_path(doc, ("a", "x")) == []
    ps = policies("""\
        policies:
          - {name: deep, action: block, match: {fields: {"a.b.*.c": "> 10", "messages.role":
              "== tool"}}}
        """, tmp_path)
    assert decide(ps, body=doc).rule == "deep"
    assert decide(ps, body={**doc, "a": {"b": [{"c": 1}]}}).rule == DEFAULT_RULE
    assert decide(ps, body=b"not json").rule == DEFAULT_RULE


def test_body_size(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - {name: big, action: block, match: {body_size: "> 1KiB"}}
          - {name: mid, action: block, match: {body_size: [">= 100", "< 1000"]}}
        """, tmp_path)
    assert decide(ps, body=b"x" * 1025).rule == "big"
    assert decide(ps, body=b"x" * 1024).rule == DEFAULT_RULE
    assert decide(ps, body=b"x" * 100).rule == "mid"
    assert decide(ps, body=None).rule == DEFAULT_RULE


def test_time_of_day(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - {name: office, action: allow, match: {time: {between: "09:00-17:00", tz: UTC,
              days: [mon, tue, wed, thu, fri]}}}
          - {name: night, action: block, match: {time: {between: "22:00-06:00",
              tz: Europe/Berlin}}}
          - {name: other, action: approve, approvers: [r]}
        """, tmp_path)

    def at(iso: str) -> str:
        now = datetime.datetime.fromisoformat(iso).timestamp()
        return decide(ps, now=now, body={}).rule

    assert at("2026-11-23T09:00:00+00:00") == "office"   # Monday
    assert at("2026-11-23T16:59:59+00:00") == "office"
    assert at("2026-11-23T17:00:00+00:00") == "other"
    assert at("2026-11-22T10:00:00+00:00") == "other"    # Sunday
    assert at("2026-11-23T21:30:00+00:00") == "night"    # 22:30 in Berlin
    assert at("2026-11-24T04:59:00+00:00") == "night"    # 05:59 in Berlin
    assert at("2026-11-24T05:00:00+00:00") == "other"


def test_prompt_words_and_regex(tmp_path: Path) -> None:
    ps = policies(r"""
        policies:
          - name: ssn
            action: block
            match: {prompt: {regex: ['\b\d{3}-\d{2}-\d{4}\b'], words: [social security number,
                                                                       "c++"]}}
          - name: cased
            action: block
            match: {prompt: {words: [SECRET], ignore_case: false}}
        """, tmp_path)

    def chat(text: str) -> dict:
        return {"model": "m", "messages": [{"role": "user", "content": text}]}

    assert decide(ps, body=chat("mine is 123-45-6789")).rule == "ssn"
    assert decide(ps, body=chat("Social\n Security   Number please")).rule == "ssn"
    assert decide(ps, body=chat("I write C++ daily")).rule == "ssn"
    assert decide(ps, body=chat("antisocial security numbers")).rule == DEFAULT_RULE
    assert decide(ps, body=chat("the SECRET plan")).rule == "cased"
    assert decide(ps, body=chat("the secret plan")).rule == DEFAULT_RULE
    # JSON escapes cannot hide a word: the pattern runs on the decoded strings
    assert decide(ps, body=b'{"messages":[{"role":"user","content":"\\u0053ECRET"}]}'
                  ).rule == "cased"
    # non-JSON bodies: the raw text
    assert decide(ps, body=b"plain SECRET text").rule == "cased"


def test_prompt_text_openai_chat_parts_and_tool_calls() -> None:
    body = {"model": "m", "messages": [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": [{"type": "text", "text": "PART1"},
                                     {"type": "image_url", "image_url": {"url": "IMG"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"q\": \"ARGS\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "TOOLRESULT"},
        {"role": "assistant", "function_call": {"name": "old", "arguments": "LEGACY"}},
    ], "tools": [{"type": "function", "function": {"name": "lookup", "description": "DESC"}}]}
    text = "\n".join(prompt_texts(body))
    for word in ("SYS", "PART1", "ARGS", "TOOLRESULT", "LEGACY"):
        assert word in text
    for word in ("IMG", "DESC", "lookup", "c1", "user"):
        assert word not in text
    assert tool_names(body) == {"lookup", "old"}


def test_prompt_text_openai_responses() -> None:
    assert prompt_texts({"model": "m", "input": "HELLO", "instructions": "INSTR"}) == \
        ["INSTR", "HELLO"]
    body = {"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "IN1"},
                                     {"type": "input_image", "image_url": "IMG"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "OUT1"}]},
        {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "ARGS"},
        {"type": "function_call_output", "call_id": "c", "output": "RESULT"},
    ], "tools": [{"type": "function", "name": "get_weather"}, {"type": "web_search_preview"}],
        "tool_choice": {"type": "function", "name": "get_weather"}}
    text = "\n".join(prompt_texts(body))
    for word in ("IN1", "OUT1", "ARGS", "RESULT"):
        assert word in text
    assert "IMG" not in text
    assert tool_names(body) == {"get_weather", "web_search_preview"}


def test_prompt_text_anthropic_messages() -> None:
    body = {"model": "claude", "system": [{"type": "text", "text": "SYSBLOCK"}], "messages": [
        {"role": "user", "content": "PLAIN"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "THOUGHT", "signature": "SIG"},
            {"type": "text", "text": "T1"},
            {"type": "tool_use", "id": "t", "name": "run_sql", "input": {"sql": "DROP"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t",
             "content": [{"type": "text", "text": "ROWS"}]},
            {"type": "tool_result", "tool_use_id": "u", "content": "ROWS2"},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                             "data": "DOC"}},
            {"type": "image", "source": {"type": "base64", "data": "B64"}}]},
    ], "tools": [{"name": "run_sql", "input_schema": {}},
                 {"type": "web_search_20250305", "name": "web_search"}]}
    text = "\n".join(prompt_texts(body))
    for word in ("SYSBLOCK", "PLAIN", "THOUGHT", "T1", "DROP", "ROWS", "ROWS2", "DOC"):
        assert word in text
    for word in ("SIG", "B64", "run_sql"):
        assert word not in text
    assert prompt_texts({"system": "S", "messages": []}) == ["S"]
    assert tool_names(body) == {"run_sql", "web_search"}


def test_prompt_text_other_json_is_all_strings() -> None:
    assert prompt_texts({"text": "a", "blocks": [{"x": "b"}, 3]}) == ["a", "b"]
    assert prompt_texts({"prompt": ["p1", "p2"]}) == ["p1", "p2"]
    assert prompt_texts(["x", {"y": "z"}]) == ["x", "z"]


def test_tools_rule(tmp_path: Path) -> None:
    ps = policies("""\
        policies:
          - {name: no-shell, action: block, match: {tools: ["shell*", run_sql]}}
        """, tmp_path)
    defs = {"tools": [{"type": "function", "function": {"name": "shell_exec"}}]}
    call = {"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "x", "name": "run_sql", "input": {}}]}]}
    assert decide(ps, body=defs).rule == "no-shell"
    assert decide(ps, body=call).rule == "no-shell"
    assert decide(ps, body={"tools": [{"name": "Shell"}]}).rule == DEFAULT_RULE  # case matters


def test_body_is_read_lazily_and_failures_surface() -> None:
    calls = []

    def body() -> bytes:
        calls.append(1)
        raise ValueError("bad gzip")

    ps = parse_policies([({"name": "m", "action": "block",
                           "match": {"method": "DELETE", "model": "x"}}, Where("f", "p[0]"))],
                        ())
    # the cheap method condition fails first: the body is never read
    assert evaluate(ps, RequestFacts("POST", "h", "/", body=body)).rule == DEFAULT_RULE
    assert calls == []
    with pytest.raises(BodyUnavailable):
        evaluate(ps, RequestFacts("DELETE", "h", "/", body=body))


def test_facts_are_computed_once() -> None:
    loads = []

    def loader():
        loads.append(1)
        return {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    f = RequestFacts("POST", "h", "/", json_loader=loader)
    assert f.model == "m" and "hi" in f.prompt_text and f.prompt_text is f.prompt_text
    assert f.tool_names == frozenset()
    assert loads == [1]


# ---------------------------------------------------------------- literal prefilter
def test_required_literals() -> None:
    import re

    from addons.policy.engine import required_literals
    assert required_literals(re.compile(r"\bcase-\d{4}\b")) == {"case-"}
    assert required_literals(re.compile(r"(?i)(?<!\w)(?:Alpha|beta\s+gamma)(?!\w)")) == \
        {"alpha", "gamma"}
    assert required_literals(re.compile(r"abc|\d+")) is None      # one branch has no literal
    assert required_literals(re.compile(r"(?:xyz)?\d")) is None   # optional: not required
    assert required_literals(re.compile(r"(?:xyz)+\d")) == {"xyz"}
    assert required_literals(re.compile(r"a.b")) is None          # too short to help


def test_case_classes_match_re_ignorecase() -> None:
    """Every character `re.IGNORECASE` equates with an ASCII letter folds to that letter."""
    import re

    from addons.policy.engine import fold
    letters = {c: re.compile(re.escape(c), re.IGNORECASE)
               for c in "abcdefghijklmnopqrstuvwxyz"}
    for cp in range(0x80, 0x20000):
        if 0xD800 <= cp < 0xE000:
            continue
        ch = chr(cp)
        for letter, rx in letters.items():
            if rx.fullmatch(ch):
                assert fold(ch) == letter, (hex(cp), letter)


@pytest.mark.parametrize("text", [
    "the Secret Project is on", "the ſecret project", "SECRET\u00a0PROJECT",
    "secret projects", "a secretproject", "bluebİrd launch", "BLUEBIRD", "ΣΊΣΥΦΟΣ σίσυφος",
    "no match here", "straße", "STRASSE", "ẞ", "Kelvin \u212aelvin", "case-1234 ok",
    "CASE-1234", "café ☕ — “quoted” secret  project",
])
def test_prefilter_never_changes_the_result(text: str) -> None:
    import re

    from addons.policy.engine import prompt_test
    patterns = [re.compile(p, f) for p, f in (
        (r"(?<!\w)(?:secret\s+project|bluebird)(?!\w)", re.I),
        (r"(?<!\w)(?:secret\s+project|bluebird)(?!\w)", 0),
        (r"\bcase-\d{4}\b", re.I), (r"σίσυφος", re.I), (r"straße", re.I), (r"kelvin", re.I),
        (r"Secret", 0))]
    for p in patterns:
        f = RequestFacts("POST", "h", "/", body=text.encode())
        assert prompt_test(p)(f) is (p.search(text) is not None), (p.pattern, text)


def test_readme_example_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "rules" / "README.md").read_text()
    section = readme[readme.index("### `policies`"):]
    example = section[section.index("```yaml\n") + 8:]
    example = example[:example.index("```")]
    (tmp_path / "a.yaml").write_text(UPSTREAMS + "  - {name: slack-hook, hosts: "
                                     "[hooks.slack.com], dialect: webhook}\n")
    (tmp_path / "b.yaml").write_text(example)
    ps = load_rules(tmp_path).policies
    assert len(ps) == 10
    ssn = {"model": "gpt-4o", "messages": [{"role": "user", "content": "ssn 123-45-6789"}]}
    assert decide(ps, body=ssn).rule == "no-customer-identifiers"
    assert decide(ps, body={"model": "gpt-4o", "n": 20}).action == "approve"
    mcp = {"model": "gpt-4o", "tools": [{"type": "mcp", "server_url": "https://x.example"}]}
    assert decide(ps, body=mcp).rule == "no-provider-side-egress"
    assert decide(ps, body={"model": "gpt-4o", "max_output_tokens": "20000"}).rule == \
        "large-answers"
    assert decide(ps, body={"input_file_id": "f"}, path="/v1/batches").rule == "hold-batches"


@pytest.mark.parametrize("raw,norm", [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/completions?x=1#f", "/v1/chat/completions"),
    ("/v1/./chat//%63ompletions", "/v1/chat/completions"),
    ("/v1/x/../chat/completions", "/v1/chat/completions"),
    ("/../../v1/chat/", "/v1/chat/"),
    ("/v1/chat%2Fcompletions", "/v1/chat/completions"),
    ("", "/"),
    ("/", "/"),
])
def test_path_normalisation(raw: str, norm: str) -> None:
    assert RequestFacts("GET", "h", raw).path == norm


def test_prompt_rule_with_regex_and_words_matches_either(tmp_path) -> None:
    """Each regex and the word list are separate patterns; any one of them matching counts."""
    from addons.config.schema import Where
    from addons.policy.config import _prompt_patterns
    from addons.policy.engine import any_prompt_test
    pats = _prompt_patterns({"regex": [r"\d{3}-\d{2}-\d{4}", r"ssn\s*dump"],
                             "words": ["exfiltrate", "bulk export"]}, Where("f", "prompt"))
    # each regex: as sent + on the skeleton; the words: on the skeleton
    assert [t for _, t in pats] == ["prompt_text", "skel_text", "prompt_text", "skel_text",
                                    "skel_text"]

    def F(text: str) -> RequestFacts:  # noqa: N802
        return RequestFacts("POST", "h", "/", body=text.encode())
    check = any_prompt_test(pats)
    assert check(F("my number is 123-45-6789"))
    assert check(F("please SSN  dump all"))
    assert check(F("time to Bulk   Export the table"))
    assert not check(F("exfiltrated is not the word"))
    assert not check(F("nothing here"))

"""Policy facts continued from a session's last request (engine.SearchHistory): the
strings of the messages it sent before, the skeleton / normalised text, the literal
prefilters and the tool names are taken from that request, and every fact and every
decision is exactly that of a from-scratch evaluation.

Differential (hypothesis): conversations that grow, are edited in the middle, cut,
replaced, with string items, nested JSON in strings, tool calls, non-ASCII text and
hyphenation at the joins; each turn evaluated through one session history and the parse
memo (as the addon does) and from scratch. Thresholds and cut spacing are made tiny so
that every path runs on small bodies.
"""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.config.schema import Where
from addons.egress.config import Upstream
from addons.frame import decode
from addons.policy import engine
from addons.policy.config import parse_policies
from addons.policy.engine import (
    BodyUnavailable,
    RequestFacts,
    SearchHistory,
    derive_text,
    evaluate,
)
from addons.policy.skeleton import normalize, skeleton

UPS = (Upstream("openai", ("api.openai.com",), "openai", None),)


def _policies(items: list[dict]) -> engine.PolicySet:
    return parse_policies([(it, Where("t.yaml", f"policies[{i}]"))
                           for i, it in enumerate(items)], UPS)


POLICIES = _policies([
    {"name": "words", "action": "block",
     "match": {"prompt": {"words": ["project bluebird", "пароль"]}}},
    {"name": "ssn", "action": "block",
     "match": {"prompt": {"regex": [r"\b\d{3}-\d{2}-\d{4}\b"]}}},
    {"name": "case-kept", "action": "approve", "approvers": ["r"],
     "match": {"prompt": {"regex": ["SeCrEt-[0-9]{2}"], "ignore_case": False}}},
    {"name": "tools", "action": "approve", "approvers": ["r"],
     "match": {"tools": ["delete_*"]}},
])
LITERALS = [frozenset({"bluebird"}), frozenset({"key=", "token:"}), frozenset({"é"})]


WORD_RULES = """
upstreams:
  - {name: openai, hosts: [api.openai.com], dialect: openai}
policies:
  - name: words
    match: {prompt: {words: [project bluebird]}}
    action: block
"""


@pytest.fixture
def tiny(monkeypatch) -> None:
    monkeypatch.setattr(engine, "INCREMENTAL_MIN_CHARS", 0)
    monkeypatch.setattr(engine, "CUT_CHARS", 3)
    monkeypatch.setattr(engine, "BLOCK_CHARS", 4)
    monkeypatch.setattr(decode, "MEMO_MIN_CHARS", 0)


def _body(messages: list, **extra) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "messages": messages, **extra}).encode()


def _facts(raw: bytes, history: SearchHistory | None, key: str | None) -> RequestFacts:
    body = decode.Body(raw, "application/json")
    body.memo_key = key
    f = RequestFacts("POST", "api.openai.com", "/v1/chat/completions", upstream="openai",
                     identity={"sub": "a"}, body=body, content_type="application/json")
    f.history = history
    return f


def _outcome(f: RequestFacts, what: str):
    try:
        if what == "decision":
            return evaluate(POLICIES, f)
        if what == "literals":
            return [(f.has_literal(lits, w)) for lits in LITERALS
                    for w in ("prompt_text", "skel_text")]
        return getattr(f, what)
    except BodyUnavailable as e:
        return ("unavailable", str(e))


FACTS = ("prompt_text", "skel_text", "norm_text", "tool_names", "literals", "decision")


def _compare(bodies: list[bytes], orders: tuple[tuple[str, ...], ...] = (FACTS,)) -> None:
    """Each body through one session (history + parse memo), in each order of facts,
    against a from-scratch evaluation."""
    for order in orders:
        h = SearchHistory()
        key = f"a\x00{uuid.uuid4().hex}"
        for raw in bodies:
            f = _facts(raw, h, key)
            for what in order:
                fresh = _outcome(_facts(raw, None, None), what)
                assert _outcome(f, what) == fresh, (what, raw[-300:])


# ---------------------------------------------------------------- generated conversations
TEXT = st.lists(st.sampled_from(
    list("ab xyz-19\n") + ["project ", "bluebird", "Project\u00a0Blue", "bird", "-\n",
                           "536-22-4519", "536-22-", "4519", "SeCrEt-42", "пароль", "é",
                           "e\u0301", "\u200b", "key=", "token:", "\u02d7\n", "가",
                           "\u0430"]), max_size=8).map("".join)


def _content() -> st.SearchStrategy:
    tool_call = st.builds(lambda n, a: [{"type": "function", "id": "c",
                                         "function": {"name": n, "arguments": a}}],
                          st.sampled_from(["delete_row", "read_row", "lookup"]), TEXT)
    nested = TEXT.map(lambda t: json.dumps({"note": t}))
    return st.one_of(
        st.builds(lambda r, c: {"role": r, "content": c},
                  st.sampled_from(["user", "assistant", "system"]), TEXT),
        st.builds(lambda c, calls: {"role": "assistant", "content": c, "tool_calls": calls},
                  TEXT, tool_call),
        st.builds(lambda parts: {"role": "user", "content": [
            {"type": "text", "text": p} for p in parts]}, st.lists(TEXT, max_size=3)),
        nested.map(lambda n: {"role": "tool", "content": n}),
        TEXT,                       # a bare string item
        st.just({}), st.just([]), st.just(7),
    )


def _conversation() -> st.SearchStrategy:
    edit = st.tuples(st.sampled_from(["append", "append", "append", "insert", "replace",
                                      "cut", "edit_last", "tools"]),
                     _content(), st.integers(0, 10**6), TEXT)
    return st.tuples(st.lists(_content(), max_size=4),
                     st.lists(edit, min_size=1, max_size=8)).map(_apply)


def _apply(args: tuple[list, list]) -> list[bytes]:
    msgs, edits = args
    msgs = list(msgs)
    extra: dict = {}
    out = [_body(msgs)]
    for kind, item, pos, text in edits:
        msgs = list(msgs)   # a new list each turn; items stay as they were sent
        i = pos % (len(msgs) + 1)
        if kind == "append":
            msgs.append(item)
        elif kind == "insert":
            msgs.insert(i, item)
        elif kind == "replace" and msgs:
            msgs[i % len(msgs)] = item
        elif kind == "cut":
            msgs = msgs[:i]
        elif kind == "edit_last" and msgs and isinstance(msgs[-1], dict):
            msgs[-1] = {**msgs[-1], "content": str(msgs[-1].get("content")) + text}
        elif kind == "tools":
            extra = {"tools": [{"type": "function", "function": {"name": "delete_" + text}}]}
        out.append(_body(msgs, **extra))
    return out


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_conversation(), st.permutations(FACTS))
def test_every_fact_and_decision_as_from_scratch(tiny, bodies: list[bytes],
                                                 order: list[str]) -> None:
    _compare(bodies, (tuple(order),))


# ---------------------------------------------------------------- targeted
def test_a_word_across_the_join_of_old_and_new_text(tiny) -> None:
    """The last message of turn 1 ends in "project" and is continued with " bluebird":
    the shared prefix ends inside the match."""
    base = [{"role": "user", "content": "hello " * 20}]
    turn1 = base + [{"role": "assistant", "content": "about project"}]
    turn2 = base + [{"role": "assistant", "content": "about project bluebird"}]
    turn3 = base + [{"role": "assistant", "content": "about project"},
                    {"role": "user", "content": "bluebird"}]  # not one phrase: allow
    _compare([_body(turn1), _body(turn2), _body(turn1), _body(turn3)])
    h = SearchHistory()
    key = "a\x00join"
    got = [evaluate(POLICIES, _facts(_body(t), h, key)).rule for t in (turn1, turn2, turn3)]
    assert got == ["<default>", "words", "<default>"]


def test_hyphenation_at_the_join_of_two_turns(tiny) -> None:
    """`blue-` + line break + `bird` joins into one word in the skeleton: the cut that
    a session's skeleton is continued from must not split it."""
    base = [{"role": "user", "content": "project blue-\n"}]
    _compare([_body(base), _body([{"role": "user", "content": "project blue-\nbird"}]),
              _body(base + [{"role": "user", "content": "bird"}])])


def test_nested_json_budget_raises_exactly_as_from_scratch(tiny, monkeypatch) -> None:
    """Known messages are not walked again, but what their nested JSON took of the budget
    is: the turn whose strings exceed it is refused exactly as a full walk refuses it."""
    inner = json.dumps({"a": json.dumps({"b": json.dumps({"c": "x" * 200})})})
    took = len(inner) + len(json.loads(inner)["a"]) + len(json.loads(json.loads(inner)["a"])["b"])
    monkeypatch.setattr(engine, "STRING_BUDGET_FACTOR", 0)
    monkeypatch.setattr(engine, "MIN_STRING_BUDGET", 3 * took + took // 2)
    msgs: list = []
    bodies = []
    for _ in range(6):
        msgs = [*msgs, {"role": "tool", "content": inner}]
        bodies.append(_body(msgs))
    outcomes = [_outcome(_facts(b, None, None), "prompt_text") for b in bodies]
    assert outcomes[0] != outcomes[-1]
    assert any(isinstance(o, tuple) and o[0] == "unavailable" for o in outcomes)
    _compare(bodies)


def test_known_messages_count_against_a_smaller_budget(tiny, monkeypatch) -> None:
    """The budget follows the body's size: drop a long field after the history and the
    known messages' nested JSON alone exceeds it (nothing new is walked to notice)."""
    inner = json.dumps({"a": json.dumps({"b": "x" * 300})})
    monkeypatch.setattr(engine, "STRING_BUDGET_FACTOR", 1)
    monkeypatch.setattr(engine, "MIN_STRING_BUDGET", 0)
    nested = [{"role": "tool", "content": inner} for _ in range(3)]
    bodies = [_body(nested, metadata="plain " * 2000),
              _body([*nested, {"role": "user", "content": "hi"}])]
    assert _outcome(_facts(bodies[0], None, None), "prompt_text")[0] != "unavailable"
    assert _outcome(_facts(bodies[1], None, None), "prompt_text")[0] == "unavailable"
    _compare(bodies)


@pytest.mark.parametrize("lit", ["bluebird", "key="])
def test_a_literal_completed_by_the_new_text(tiny, lit: str) -> None:
    """Every split of a literal between the last text and the new one: found exactly
    when a full search finds it (the search starts len(lit) - 1 before the new text)."""
    base = [{"role": "user", "content": "hello " * 30}]
    for k in range(len(lit) + 1):
        old = base + [{"role": "user", "content": "say " + lit[:k]}]
        new = base + [{"role": "user", "content": "say " + lit}]
        _compare([_body(old), _body(new)], (("literals",), ("skel_text", "literals")))
        h = SearchHistory()
        _facts(_body(old), h, f"a\x00lit{k}{lit}").has_literal(frozenset({lit}), "prompt_text")
        assert _facts(_body(new), h, f"a\x00lit{k}{lit}").has_literal(
            frozenset({lit}), "prompt_text")


def test_a_known_message_is_not_walked_again(tiny, monkeypatch) -> None:
    h = SearchHistory()
    key = "a\x00walks"
    msgs = [{"role": "user", "content": f"message {i} " * 30} for i in range(40)]
    f = _facts(_body(msgs), h, key)
    f.skel_text
    f.tool_names
    assert h.derived_chars == 0   # the first text: no cuts to go on from
    walked: list = []
    real = engine.all_strings

    def counting(node, *a, **kw):
        walked.append(node)
        return real(node, *a, **kw)

    monkeypatch.setattr(engine, "all_strings", counting)
    f2 = _facts(_body([*msgs, {"role": "user", "content": "new"}]), h, key)
    text = f2.prompt_text
    # only the new message was walked (one call for it, none for the 40 known ones)
    assert walked == [{"role": "user", "content": "new"}]
    monkeypatch.setattr(engine, "all_strings", real)
    assert text == _facts(_body([*msgs, {"role": "user", "content": "new"}]),
                          None, None).prompt_text
    assert f2.tool_names == frozenset()
    f2.skel_text
    assert h.derived_chars > 1000   # the skeleton went on from the last text's cuts


def test_a_look_alike_message_is_walked(tiny, monkeypatch) -> None:
    """Known means the very object the parse memo kept for this session: another
    session, or a body that does not start as the last one did, walks every message."""
    h = SearchHistory()
    msgs = [{"role": "user", "content": "x " * 50}]
    _facts(_body(msgs), h, "a\x00one").prompt_text
    walked: list = []
    real = engine.all_strings
    monkeypatch.setattr(engine, "all_strings",
                        lambda node, *a, **kw: (walked.append(node), real(node, *a, **kw))[1])
    # the same content under another memo key: other parsed objects
    _facts(_body(msgs), h, "b\x00two").prompt_text
    assert walked == [msgs[0]]


def test_derive_text_cuts(tiny) -> None:
    for fn in (skeleton, normalize):
        old_src = "Hello wörld-\nfoo 123 Bar\u200bbaz " * 4
        out, cuts, _ = derive_text(fn, old_src, None, 0)
        assert out == fn(old_src)
        for j, s in cuts:
            assert out[:s] == fn(old_src[:j])
        for new_src in (old_src + "more ÄÖ text", old_src[:20] + "x", old_src[:-5],
                        "Z" + old_src):
            common = len(__import__("os").path.commonprefix([old_src, new_src]))
            got, _, kept = derive_text(fn, new_src, (out, cuts), common)
            assert got == fn(new_src)
            assert kept <= common


def test_reloaded_rules_start_sessions_afresh(tmp_path) -> None:
    from addons.config.loader import load_rules
    from addons.policy.addon import Policy
    from tests.policy.test_addon import make_holder, openai_flow, run
    rules = WORD_RULES
    holder = make_holder(tmp_path, rules)
    addon = Policy(holder)
    msgs = [{"role": "user", "content": "the project bluebird plan " + "x " * 5000}]
    hdr = {"x-agent-session": "s1"}
    f = run(addon, openai_flow({"model": "m", "messages": msgs}, headers=hdr))
    assert f.response.status_code == 403
    first = addon.histories
    assert len(first) == 1
    d = tmp_path / "rules2"
    d.mkdir()
    (d / "r.yaml").write_text(rules.replace("project bluebird", "project kestrel"))
    holder.install(load_rules(d))
    msgs2 = [*msgs, {"role": "user", "content": "about project kestrel"}]
    f = run(addon, openai_flow({"model": "m", "messages": msgs2}, headers=hdr))
    assert f.response.status_code == 403
    assert addon.histories is not first and len(addon.histories) == 1
    f = run(addon, openai_flow({"model": "m", "messages": msgs}, headers=hdr))
    assert f.response is None   # the old word no longer blocks


def test_literal_prefilter_only_over_new_text(tiny) -> None:
    h = SearchHistory()
    key = "a\x00lits"
    msgs = [{"role": "user", "content": "plain words " * 400}]
    lits = frozenset({"bluebird"})
    f = _facts(_body(msgs), h, key)
    assert not f.has_literal(lits, "skel_text")
    saved = h.saved_chars
    msgs = [*msgs, {"role": "user", "content": "blue"}]
    f = _facts(_body(msgs), h, key)
    assert not f.has_literal(lits, "skel_text")
    assert h.saved_chars - saved > 4000   # the shared text was not searched again
    msgs = [*msgs[:-1], {"role": "user", "content": "bluebird"}]
    f = _facts(_body(msgs), h, key)
    assert f.has_literal(lits, "skel_text")
    # found before, in the shared part: found without searching
    f = _facts(_body([*msgs, {"role": "user", "content": "more"}]), h, key)
    assert f.has_literal(lits, "skel_text")


def test_a_continued_turn_is_evaluated_on_the_loop(tmp_path, monkeypatch) -> None:
    """Past THREAD_MIN_BYTES a body goes to a worker thread, unless it continues its
    session's last body by little: then the work left is that little. A first long body,
    one that adds more than INLINE_NEW_CHARS, an edited one and a compressed one still
    go to the thread; every decision is as before."""
    import gzip

    from addons.policy import addon as policy_addon
    from addons.policy.addon import Policy
    from tests.frame.threadcount import count_to_thread
    from tests.policy.test_addon import make_holder, openai_flow, run
    rules = WORD_RULES
    threaded = count_to_thread(monkeypatch, policy_addon)
    addon = Policy(make_holder(tmp_path, rules))
    hdr = {"x-agent-session": "inline"}
    msgs = [{"role": "user", "content": "plain words here " * 5000}]   # ~85 KB

    def turn(messages: list, **kw) -> tuple[int | None, int]:
        before = len(threaded)
        f = run(addon, openai_flow({"model": "m", "messages": messages}, headers=hdr, **kw))
        return (f.response.status_code if f.response else None), len(threaded) - before

    assert turn(msgs) == (None, 1)                        # first long body: thread
    msgs = [*msgs, {"role": "assistant", "content": "fine " * 200}]
    assert turn(msgs) == (None, 0)                        # continued by 1 KB: inline
    msgs = [*msgs, {"role": "user", "content": "now project bluebird"}]
    assert turn(msgs) == (403, 0)                         # same decision, inline
    big = [*msgs, {"role": "user", "content": "more words " * 2000}]
    assert turn(big) == (403, 1)                          # 22 KB new: thread
    edited = [{"role": "user", "content": "other words " * 8000}, *msgs[1:]]
    assert turn(edited) == (403, 1)                       # not a continuation: thread
    f = openai_flow(None, headers={**hdr, "content-encoding": "gzip"})
    f.request.raw_content = gzip.compress(json.dumps(
        {"model": "m", "messages": [*edited, {"role": "user", "content": "x"}]}).encode())
    before = len(threaded)
    run(addon, f)
    assert len(threaded) - before == 1 and f.response.status_code == 403


def test_a_turn_decided_before_the_prompt_is_read(tiny) -> None:
    """A turn decided by an earlier rule (a field) never builds its prompt text, but its
    parse moves the session's parse memo on: the next turn continues that parse, not the
    one the session's prompt record was made from, and must not take that record's
    spans (the two conversations share nothing)."""
    policies = _policies([
        {"name": "hot", "action": "block", "match": {"fields": {"temperature": "> 1"}}},
        {"name": "words", "action": "block",
         "match": {"prompt": {"words": ["project bluebird"]}}},
        {"name": "tools", "action": "approve", "approvers": ["r"],
         "match": {"tools": ["delete_*"]}},
    ])
    a = [{"role": "user", "content": "quiet words " * 40},
         {"role": "assistant", "content": "fine", "tool_calls": [
             {"type": "function", "id": "c", "function": {"name": "read", "arguments": ""}}]}]
    b = [{"role": "user", "content": "the project bluebird plan " * 40},
         {"role": "assistant", "content": "ok", "tool_calls": [
             {"type": "function", "id": "c", "function": {"name": "delete_all",
                                                          "arguments": ""}}]}]
    h = SearchHistory()
    key = "a\x00decided"

    def body(msgs: list, temperature: float) -> bytes:
        return json.dumps({"model": "m", "messages": msgs,
                           "temperature": temperature}).encode()

    assert evaluate(policies, _facts(body(a, 0), h, key)).rule == "<default>"
    assert evaluate(policies, _facts(body(b, 2), h, key)).rule == "hot"
    c = body([*b, {"role": "user", "content": "go on"}], 0)
    got = _facts(c, h, key)
    fresh = _facts(c, None, None)
    assert got.tool_names == fresh.tool_names
    assert got.decoded.reused == 2   # the memo went on from the decided turn's parse
    assert got.prompt_text == fresh.prompt_text
    assert evaluate(policies, _facts(c, h, key)).rule == "words"


def test_a_continued_body_past_the_inline_bound_is_evaluated_in_the_thread(
        tmp_path, monkeypatch) -> None:
    """What stays proportional to the whole body (decode, one memcmp) is bounded on the
    loop: past INLINE_MAX_BYTES a continued body goes to the thread all the same."""
    from addons.policy import addon as policy_addon
    from addons.policy.addon import Policy
    from tests.frame.threadcount import count_to_thread
    from tests.policy.test_addon import make_holder, openai_flow, run
    threaded = count_to_thread(monkeypatch, policy_addon)
    monkeypatch.setattr(policy_addon, "INLINE_MAX_BYTES", 95 * 1024)
    addon = Policy(make_holder(tmp_path, WORD_RULES))
    hdr = {"x-agent-session": "bound"}
    msgs = [{"role": "user", "content": "plain words here " * 5000}]   # ~85 KB

    def turn(messages: list) -> int:
        before = len(threaded)
        run(addon, openai_flow({"model": "m", "messages": messages}, headers=hdr))
        return len(threaded) - before

    assert turn(msgs) == 1
    msgs = [*msgs, {"role": "assistant", "content": "fine " * 200}]
    assert turn(msgs) == 0                                   # 86 KB, continued: loop
    msgs = [*msgs, {"role": "assistant", "content": "fine " * 3000}]
    assert turn(msgs) == 1                                   # 101 KB, past the bound
    msgs = [*msgs, {"role": "user", "content": "x"}]
    assert turn(msgs) == 1                                   # continued by 1: thread

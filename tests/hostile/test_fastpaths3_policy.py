"""Hostile: policy's per-session prompt facts (engine.SearchHistory, the skeleton and
normalised forms built from the new text alone, the literal prefilters, the per-item
records keyed by the parse memo's generation) through a real mitmdump. Each second turn
of a session continues the first one's text in a way meant to make an incremental search
miss (or invent) a match: a phrase split across the join of old and new text, a
confusable or a combining mark at the join, a hyphenated line break at the join, an
earlier message edited (same length) to remove or introduce a forbidden phrase, the
other message list ("input" before "messages"), a look-behind reaching back over the join.

Differential: the second turn's answer (status and what the upstream received) must be
the answer the same body gets in a fresh session, where nothing is incremental."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.integration

OPENAI = "https://api.openai.com/v1/chat/completions"
FILLER = "lorem ipsum dolor sit amet " * 400  # past INCREMENTAL_MIN_CHARS and the memo's
POLICY = r"""policies:
  - name: no-bluebird
    match:
      prompt:
        words: [project bluebird]
    action: block
    message: forbidden words
  - name: no-codename
    match:
      prompt:
        regex: ['(?<=agent )zulu\b', 'ex\s*fil\s*trate']
    action: block
    message: forbidden pattern
"""


def msg(text: str, role: str = "user") -> dict:
    return {"role": role, "content": text}


def chat(msgs: list[dict], **extra: object) -> str:
    return json.dumps({"model": "gpt-4o-mini", "messages": msgs, **extra})


def variants() -> list[tuple[str, str, str]]:
    base = [msg(FILLER)]
    out = []
    # a phrase split across the join: the first turn's last message ends with its start,
    # the second turn's new message (or the edited last one) has the rest
    for cut in ("project blue", "project ", "proj", "project\u00ad blue"):
        rest = "project bluebird"[len(cut.replace("\u00ad", "")):]
        out.append((f"split {cut!r} / new message", chat([*base, msg("x " + cut)]),
                    chat([*base, msg("x " + cut), msg(rest + " now")])))
        out.append((f"split {cut!r} / last message grows", chat([*base, msg("x " + cut)]),
                    chat([*base, msg("x " + cut + rest)])))
    # confusables and marks at the join
    out += [
        ("cyrillic o at the join", chat([*base, msg("x pr")]),
         chat([*base, msg("x pr\u043eject bluebird")])),
        ("fullwidth at the join", chat([*base, msg("x project")]),
         chat([*base, msg("x project \uff42luebird")])),
        ("combining mark after the join", chat([*base, msg("x project blue")]),
         chat([*base, msg("x project blue\u0301bird")])),
        ("zero width at the join", chat([*base, msg("x project")]),
         chat([*base, msg("x project\u200b bluebird")])),
        ("hyphenated line break at the join", chat([*base, msg("x project blue-")]),
         chat([*base, msg("x project blue-\nbird")])),
        ("look-behind over the join", chat([*base, msg("x agent ")]),
         chat([*base, msg("x agent zulu")])),
        ("word boundary after the join", chat([*base, msg("x agent zulu")]),
         chat([*base, msg("x agent zuluX")])),
        ("spaced regex over the join", chat([*base, msg("x ex fil")]),
         chat([*base, msg("x ex fil trate")])),
    ]
    # earlier message edited, same length
    bad = msg("project bluebird " + FILLER)
    good = msg("project bluebirb " + FILLER)
    tail = [msg("ok", "assistant"), msg("next")]
    out += [
        ("earlier message edited to remove", chat([bad, *tail]), chat([good, *tail])),
        ("earlier message edited to introduce", chat([good, *tail]), chat([bad, *tail])),
        ("a blocked history goes on", chat([bad, *tail]), chat([bad, *tail, msg("more")])),
        ("role changed", chat([msg("project bluebird", "system"), *base]),
         chat([msg("project bluebird", "user"), *base])),
    ]
    # the other list: "input" first (the memo continues it), "messages" changes
    out.append(("input before messages",
                json.dumps({"model": "gpt-4o-mini", "input": base, "messages": [msg("hi")]}),
                json.dumps({"model": "gpt-4o-mini", "input": base,
                            "messages": [msg("project bluebird")]})))
    return out


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity + POLICY)


def send(c: httpx.Client, session: str, text: str) -> int:
    return c.post(OPENAI, content=text.encode(), headers={
        "content-type": "application/json", "x-agent-session": session,
        "authorization": "Bearer sk-agent"}).status_code


def test_second_turns_are_judged_as_fresh_bodies(gw, standin) -> None:
    bad = []
    seen: dict[str, int] = {}
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for i, (name, one, two) in enumerate(variants()):
            send(c, f"s-{i}", one)
            standin.clear()
            got = send(c, f"s-{i}", two)
            up_cont = [r["body"] for r in standin.requests]
            standin.clear()
            want = send(c, f"fresh-{i}", two)
            up_full = [r["body"] for r in standin.requests]
            standin.clear()
            seen[name] = want
            if (got, up_cont) != (want, up_full):
                bad.append((name, got, want))
    assert bad == [], bad
    # the differential means something: both answers occur, where a reader expects them
    assert seen["split 'project blue' / last message grows"] == 403
    assert seen["earlier message edited to remove"] == 200
    assert seen["earlier message edited to introduce"] == 403
    assert seen["cyrillic o at the join"] == 403
    assert seen["look-behind over the join"] == 403
    assert seen["word boundary after the join"] == 200
    assert seen["a blocked history goes on"] == 403


def test_one_sessions_history_is_not_anothers(gw, standin) -> None:
    """Two sessions send the same long history; one goes on with the phrase's start and
    the other with its end: neither is judged on the other's text."""
    base = [msg(FILLER)]
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        assert send(c, "a", chat([*base, msg("project")])) == 200
        assert send(c, "b", chat([*base, msg("bluebird")])) == 200
        assert send(c, "a", chat([*base, msg("project"), msg("then")])) == 200
        assert send(c, "b", chat([*base, msg("bluebird"), msg("then")])) == 200
        assert send(c, "a", chat([*base, msg("project bluebird")])) == 403

"""store.SplitCache: a body that extends the session's previous one is cut and hashed only
past the shared text — and gives exactly the blobs, root address and model a fresh cut
gives, whatever the next body is (edited history, numbers as elements, other keys, bytes
that are not JSON, non-ASCII text)."""

from __future__ import annotations

import json
import random

from addons.recording import store


def both(body: bytes, cache: store.SplitCache, key: object = "s") -> None:
    fresh: dict = {}
    fresh_facts: dict = {}
    root = store.blob_tree(body, fresh, fresh_facts)
    cached: dict = {}
    cached_facts: dict = {}
    assert store.blob_tree(body, cached, cached_facts, cache, key) == root
    assert cached == fresh
    assert cached_facts == fresh_facts
    assert store.blob_content(cached, root) == body


def test_a_conversation_turn_by_turn_with_other_sessions_between() -> None:
    cache = store.SplitCache()
    talks: dict[str, list] = {"a": [], "b": []}
    for turn in range(30):
        for who, msgs in talks.items():
            msgs.append({"role": "user" if turn % 2 else "assistant",
                         "content": f"{who} turn {turn} ünïcødé \u2028 \"quoted\" " * 20})
            body = json.dumps({"model": "m", "messages": msgs, "stream": False},
                              ensure_ascii=turn % 3 == 0).encode()
            both(body, cache, who)
    msgs = talks["a"] + [{"role": "user", "content": "one more"}]
    body = json.dumps({"model": "m", "messages": msgs, "stream": False},
                      ensure_ascii=False).encode()  # as the last turn was
    cut = store._split(body, None, cache.get("a"))  # noqa: SLF001
    assert cut is not None and cut.kept == len(cut.pieces) - 2  # one new message, the tail


def test_what_does_not_extend_the_previous_body_is_cut_afresh() -> None:
    first = (b'{"model":"m","messages":[{"role":"user","content":"one"},'
             b'{"role":"x","content":"two"}]}')
    nexts = [
        # an earlier message edited
        b'{"model":"m","messages":[{"role":"user","content":"ONE"},{"role":"x","content":"two"}]}',
        # the history cut short, then grown again
        b'{"model":"m","messages":[{"role":"user","content":"one"}]}',
        b'{"model":"m","messages":[{"role":"user","content":"one"},{"role":"x","content":"two"},3]}',
        # a number element: where it ends depends on what follows it
        b'{"model":"m","messages":[{"role":"user","content":"one"},{"role":"x","content":"two"},34]}',
        b'{"model":"m","messages":[{"role":"user","content":"one"},{"role":"x","content":"two"},34.5e1,"s"]}',
        # the model after the messages, twice, not a string
        b'{"messages":[{"role":"user","content":"one"}],"model":"late","model":7}',
        b'{"messages":[{"role":"user","content":"one"}],"model":"late","model":"again"}',
        # several split arrays, nested arrays, whitespace
        b'{"tools":[{"t":1},[1,[2]]], "messages" : [ {"a":"\\u00e9"} , {"b":[]} ] , "x":{}}',
        b'{"tools":[{"t":1},[1,[2]]], "messages" : [ {"a":"\\u00e9"} , {"b":[]} , {"c":1}] }',
        # not a splittable object at all, or not UTF-8, or trailing bytes
        b'[{"messages":[1]}]', b'{"messages":[{"a":1}]} trailing', b'\xff{"messages":[]}',
        b'{"tools":[{"t":1},[1,[2]]], "messages" : [ {"a":"\\u00e9"} , {"b":[]} ] , "x":{}',
        b'{"messages":[]}', b'{}', b' {"messages":[{"a":"\xc3\xa9\xc3\xa9"},{"b":"\xe2\x82\xac"}]}',
        b' {"messages":[{"a":"\xc3\xa9\xc3\xa9"},{"b":"\xe2\x82\xac"},{"c":"\xf0\x9f\x98\x80"}]}',
    ]
    cache = store.SplitCache()
    both(first, cache)
    for body in nexts:
        both(body, cache)
        both(first, cache)
        both(body, cache)


def _random_body(rng: random.Random, msgs: list[str]) -> bytes:
    parts = []
    if rng.random() < 0.8:
        parts.append('"model":' + rng.choice(['"gpt"', '"m\\u00e9"', "1", "null"]))
    parts.append('"messages":' + rng.choice(["[", "[ "]) + rng.choice([",", ", "]).join(msgs)
                 + "]")
    if rng.random() < 0.3:
        parts.append('"tools":[' + ",".join(msgs[:2]) + "]")
    if rng.random() < 0.3:
        parts.append('"stream":true')
    rng.shuffle(parts) if rng.random() < 0.2 else None
    return ("{" + ",".join(parts) + "}").encode()


def test_random_conversations_and_mutations_agree_with_a_fresh_cut() -> None:
    rng = random.Random(16)
    elements = ['{"role":"user","content":"hi"}', '{"c":"\\"q\\" \u00fc"}', "12", "1.5",
                '"text"', "[1,2]", "true", '{"n":[{"d":null}]}', "-0", '"\u20ac"']
    cache = store.SplitCache(entries=4)
    for _ in range(600):
        key = rng.randrange(6)
        msgs = [rng.choice(elements) for _ in range(rng.randrange(1, 6))]
        for _turn in range(rng.randrange(1, 5)):
            body = _random_body(rng, msgs)
            if rng.random() < 0.1:  # a byte flipped anywhere
                i = rng.randrange(len(body))
                body = body[:i] + bytes([rng.randrange(256)]) + body[i + 1:]
            both(body, cache, key)
            msgs.append(rng.choice(elements))
            if rng.random() < 0.2:
                msgs[rng.randrange(len(msgs))] = rng.choice(elements)


def test_the_cache_is_bounded_in_entries_and_bytes() -> None:
    cache = store.SplitCache(entries=3, max_bytes=20_000)
    body = json.dumps({"messages": [{"c": "x" * 1000}, {"c": "y"}]}).encode()
    for k in range(10):
        store.blob_tree(body, {}, None, cache, k)
    assert len(cache) == 3 and cache.bytes <= 20_000
    big = json.dumps({"messages": [{"c": "x" * 18_500}, {"c": "y"}]}).encode()
    store.blob_tree(big, {}, None, cache, "big")
    assert cache.bytes <= 20_000 and cache.get("big") is not None and len(cache) == 1
    huge = json.dumps({"messages": [{"c": "x" * 25_000}, {"c": "y"}]}).encode()
    store.blob_tree(huge, {}, None, cache, "huge")
    assert cache.get("huge") is None and cache.bytes <= 20_000


def test_the_writer_process_builds_rows_with_the_cache_the_same() -> None:
    from mitmproxy.test import tflow

    from addons.recording import writerproc
    from addons.recording.addon import ConnStates, flow_state

    msgs: list[dict] = []
    for turn in range(12):
        msgs.append({"role": "user", "content": f"turn {turn} " + "words " * 200})
        f = tflow.tflow(resp=True)
        f.request.content = json.dumps({"model": "m", "messages": msgs}).encode()
        p = store.Pending(state=flow_state(f, ConnStates()), session="conv")
        assert writerproc.build(p) == store.build_row(p)


def test_identities_sharing_a_session_name_do_not_share_an_entry() -> None:
    from mitmproxy.test import tflow

    from addons.recording.addon import ConnStates, flow_state

    cache = store.SplitCache()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000},
                                                  {"role": "user", "content": "y"}]}).encode()
    rows = []
    for sub in ("alice", "mallory", "alice"):
        f = tflow.tflow(resp=True)
        f.request.content = body
        f.metadata["identity"] = {"sub": sub, "iss": "https://idp"}
        p = store.Pending(state=flow_state(f, ConnStates()), session="shared")
        rows.append(store.build_row(p, splits=cache))
        assert rows[-1] == store.build_row(p)
    assert len(cache) == 2 and cache.cuts == 3 and cache.resumed == 1  # alice's second only

"""Masking a body past THREAD_MIN_BYTES runs in a worker thread, unless the flow's parse
(policy's, with the session's memo) took all but a little of it from the session's
previous body and the session's cache holds that body's messages as masked: then the work
left is that little, done on the loop (the hand-over cost more than it). Whatever the path,
the bytes sent upstream are those of masking the body from scratch."""

from __future__ import annotations

from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addons.frame import decode
from addons.masking import addon as masking_addon
from addons.masking.addon import Masking
from addons.masking.masker import Masker
from addons.policy.addon import session_key as policy_session_key
from tests.frame.threadcount import count_to_thread
from tests.masking.test_addon import addon_for, flow, run
from tests.masking.test_masker import FakeDetectors


@pytest.fixture(autouse=True)
def _fresh_memos() -> None:
    decode.MEMOS.clear()


def _turn(m: Masking, messages: list, threaded: list, *, upstream: str = "openai",
          session: str = "s1", parsed: bool = True) -> tuple[bytes, int]:
    f = flow(upstream, {"model": "m", "messages": messages},
             headers={"x-agent-session": session})
    if parsed:  # as policy reads it before masking, with the session's memo key
        body = decode.request_body(f, memo_key=policy_session_key(f))
        assert body is not None
        body.json  # noqa: B018
    before = len(threaded)
    with taddons.context(m):
        m.requestheaders(f)
        run(m.request(f))
    assert f.response is None
    return f.request.content, len(threaded) - before


def test_continued_turns_are_masked_on_the_loop_and_equal_a_twin(tmp_path: Path,
                                                                 monkeypatch) -> None:
    threaded = count_to_thread(monkeypatch, masking_addon)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    m = addon_for(tmp_path / "a")
    twin = addon_for(tmp_path / "b")  # its flows are never parsed first: always the thread
    twin._masker = Masker(FakeDetectors(), b"key", twin.sessions)
    msgs = [{"role": "user", "content": "plain words, mail ann@example.com " * 2500}]  # 85 KB

    def both(messages: list, expect_thread: int, **kw) -> None:
        got, n = _turn(m, messages, threaded, **kw)
        # the twin's own session name: the parse memos are process-wide, keyed by session
        want, _ = _turn(twin, messages, [], parsed=False, session="twin")
        assert got == want
        assert n == expect_thread
        assert b"ann@example.com" not in got

    both(msgs, 1)                                               # first long body: thread
    msgs = [*msgs, {"role": "assistant", "content": "fine, bob@example.com " * 50}]
    both(msgs, 0)                                               # continued by 1 KB: loop
    msgs = [*msgs, {"role": "user", "content": "and card 4111 1111 1111 1111 please"}]
    both(msgs, 0)
    big = [*msgs, {"role": "user", "content": "more words " * 2000}]
    both(big, 1)                                                # 22 KB new: thread
    edited = [{"role": "user", "content": "other words eve@example.com " * 3000}, *msgs[1:]]
    both(edited, 1)                                             # not a continuation: thread
    more = [*edited, {"role": "user", "content": "x"}]
    m.message_caches.clear()                                    # cache gone (evicted)
    both(more, 1)                                               # nothing cached: thread
    more = [*more, {"role": "user", "content": "y"}]
    both(more, 0)                                               # cached again: loop
    # another session continuing nothing of its own: thread
    got, n = _turn(m, [*more, {"role": "user", "content": "z"}], threaded, session="s2")
    assert n == 1 and b"ann@example.com" not in got
    # the same session sent unparsed (no rule read it): thread, as before
    got, n = _turn(m, [*more, {"role": "user", "content": "w"}], threaded, parsed=False)
    assert n == 1


def test_a_continued_body_past_the_inline_bound_goes_to_the_thread(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """What stays proportional to the whole body on the loop is bounded: past
    INLINE_MAX_BYTES a continued body is masked in the thread all the same."""
    threaded = count_to_thread(monkeypatch, masking_addon)
    monkeypatch.setattr(masking_addon, "INLINE_MAX_BYTES", 150 * 1024)
    m = addon_for(tmp_path)
    msgs = [{"role": "user", "content": "plain words, mail ann@example.com " * 2500}]
    assert _turn(m, msgs, threaded)[1] == 1
    msgs = [*msgs, {"role": "user", "content": "x"}]
    assert _turn(m, msgs, threaded)[1] == 0                     # 85 KB: loop
    msgs = [*msgs, {"role": "user", "content": "more words, bob@example.com " * 4000}]
    assert _turn(m, msgs, threaded)[1] == 1                     # 110 KB new: thread
    msgs = [*msgs, {"role": "user", "content": "y"}]
    got, n = _turn(m, msgs, threaded)                           # 197 KB, past 150 KB: thread
    assert n == 1 and b"bob@example.com" not in got

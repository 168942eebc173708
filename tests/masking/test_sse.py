"""Incremental SSE masking (pure): events across chunk boundaries, per-channel hold-back."""

from __future__ import annotations

import gzip
import json
import random
import zlib

import pytest

from addons.masking.bodies import Masked
from addons.masking.masker import Masker, Session
from addons.masking.sse import SSEEvent, StreamDecoder, StreamMasker, StreamTooLarge
from tests.masking.test_masker import FakeDetectors

TEXT = "Sure. Contact ann@example.com or pay with 4111 1111 1111 1111 today. " * 2


def pieces(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


def sse(events: list[tuple[str | None, object]], eol: str = "\n") -> bytes:
    out = ""
    for name, data in events:
        payload = data if isinstance(data, str) else json.dumps(data)
        out += (f"event: {name}{eol}" if name else "") + f"data: {payload}{eol}{eol}"
    return out.encode()


def chat_stream(text: str, n: int = 3, tool_args: str | None = None) -> bytes:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    ev: list = [(None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                     "content": ""}}]})]
    for p in pieces(text, n):
        ev.append((None, {**base, "choices": [{"index": 0, "delta": {"content": p},
                                               "finish_reason": None}]}))
    if tool_args is not None:
        ev.append((None, {**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": ""}}]}}]}))
        for p in pieces(tool_args, n):
            ev.append((None, {**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": p}}]}}]}))
    ev.append((None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    ev.append((None, "[DONE]"))
    return sse(ev)


def anthropic_stream(text: str, n: int = 3, json_args: str | None = None) -> bytes:
    ev: list = [("message_start", {"type": "message_start", "message": {"id": "m", "content": []}}),
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})]
    for p in pieces(text, n):
        ev.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": p}}))
    ev.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if json_args is not None:
        ev.append(("content_block_start", {"type": "content_block_start", "index": 1,
                                           "content_block": {"type": "tool_use", "id": "t",
                                                             "name": "f", "input": {}}}))
        for p in pieces(json_args, n):
            ev.append(("content_block_delta", {"type": "content_block_delta", "index": 1,
                                               "delta": {"type": "input_json_delta",
                                                         "partial_json": p}}))
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": 1}))
    ev += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
           ("message_stop", {"type": "message_stop"})]
    return sse(ev)


def responses_stream(text: str, n: int = 3) -> bytes:
    ev: list = [("response.created", {"type": "response.created", "response": {"output": []}})]
    for p in pieces(text, n):
        ev.append(("response.output_text.delta", {"type": "response.output_text.delta",
                                                  "output_index": 0, "content_index": 0,
                                                  "item_id": "i", "delta": p}))
    ev.append(("response.output_text.done", {"type": "response.output_text.done",
                                             "output_index": 0, "content_index": 0,
                                             "text": text}))
    ev.append(("response.completed", {"type": "response.completed", "response": {
        "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}]}}))
    return sse(ev)


def make(restore: bool = False, session: Session | None = None, **kw) -> tuple[StreamMasker, dict]:
    found: dict = {}
    ctx = Masked(Masker(FakeDetectors()), session or Session(), found, restorable=False,
                 restore=restore, dialect="openai")
    return StreamMasker(ctx, **kw), found


def run(sm: StreamMasker, raw: bytes, seed: int = 0, max_chunk: int = 7) -> tuple[bytes, list]:
    """Feed in random chunk sizes; return the output and per-call outputs."""
    rnd = random.Random(seed)
    calls = []
    i = 0
    while i < len(raw):
        n = rnd.randint(1, max_chunk)
        res = sm(raw[i:i + n])
        assert isinstance(res, list) and b"" not in res  # never b"" mid-stream
        calls.append(res)
        i += n
    calls.append(sm(b""))
    return b"".join(b"".join(c) for c in calls), calls


def events(raw: bytes) -> list[SSEEvent]:
    return [SSEEvent(p.encode() + b"\n\n") for p in raw.decode().split("\n\n") if p.strip()]


def chat_text(raw: bytes) -> tuple[str, str]:
    content, args = "", ""
    for ev in events(raw):
        if ev.data == "[DONE]":
            continue
        for ch in json.loads(ev.data)["choices"]:
            d = ch.get("delta") or {}
            content += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                args += tc["function"].get("arguments") or ""
    return content, args


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 3, 17])
def test_openai_chat_values_split_across_events_and_chunks(seed: int, n: int) -> None:
    sm, found = make()
    out, _ = run(sm, chat_stream(TEXT, n), seed)
    content, _ = chat_text(out)
    expected = "Sure. Contact [EMAIL_1] or pay with [CREDIT_CARD_1] today. " * 2
    assert content == expected
    assert b"ann@" not in out and b"4111" not in out and b"1111 1111" not in out
    assert found == {"EMAIL": {"count": 2, "strategy": "placeholder"},
                     "CREDIT_CARD": {"count": 2, "strategy": "placeholder"}}
    evs = events(out)
    assert evs[-1].data == "[DONE]"
    assert json.loads(evs[-2].data)["choices"][0]["finish_reason"] == "stop"


def test_openai_chat_tool_arguments_restored_with_json_escaping() -> None:
    s = Session()
    Masker(FakeDetectors()).mask_text('ann@example.com', s, {})
    s._restore["[EMAIL_1]"] = 'ann"q@example.com'  # a value that needs escaping in JSON
    sm, _ = make(restore=True, session=s)
    args = json.dumps({"to": "[EMAIL_1]", "cc": "eve@example.com"})
    out, _ = run(sm, chat_stream("Hi [EMAIL_1]!", 2, tool_args=args), seed=3)
    content, got_args = chat_text(out)
    assert content == 'Hi ann"q@example.com!'
    assert json.loads(got_args) == {"to": 'ann"q@example.com', "cc": "[EMAIL_2]"}


def test_anthropic_text_and_input_json() -> None:
    sm, found = make()
    args = json.dumps({"email": "bob@example.com"})
    out, _ = run(sm, anthropic_stream(TEXT, 2, json_args=args), seed=1)
    assert b"ann@" not in out and b"bob@" not in out and b"4111" not in out
    text, js = "", ""
    names = []
    for ev in events(out):
        obj = json.loads(ev.data)
        names.append(obj["type"])
        if obj["type"] == "content_block_delta":
            d = obj["delta"]
            text += d.get("text", "")
            js += d.get("partial_json", "")
    assert text.startswith("Sure. Contact [EMAIL_1] or pay with [CREDIT_CARD_1]")
    assert json.loads(js) == {"email": "[EMAIL_2]"}
    # the held text of a block comes before its stop event
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    last_delta_of_0 = max(i for i, ev in enumerate(events(out))
                          if '"index":0' in ev.data and "content_block_delta" in ev.data)
    first_stop = names.index("content_block_stop")
    assert last_delta_of_0 < first_stop


def test_responses_deltas_done_and_completed_agree() -> None:
    sm, _ = make()
    out, _ = run(sm, responses_stream(TEXT, 4), seed=2)
    assert b"ann@" not in out and b"4111" not in out
    deltas, done, completed = "", None, None
    for ev in events(out):
        obj = json.loads(ev.data)
        if obj["type"] == "response.output_text.delta":
            deltas += obj["delta"]
        elif obj["type"] == "response.output_text.done":
            done = obj["text"]
        elif obj["type"] == "response.completed":
            completed = obj["response"]["output"][0]["content"][0]["text"]
    assert deltas == done == completed


def test_first_text_leaves_before_the_stream_ends() -> None:
    """Never buffer the whole stream: text beyond the hold-back is emitted immediately."""
    sm, _ = make()
    text = "x" * 500
    raw = chat_stream(text, 5)
    head = raw[: len(raw) // 3]
    out = b"".join(sm(head))
    content, _ = chat_text(out)
    fed = sum(len(p) for p in pieces(text, 5)[: head.count(b'"content": "x')])
    assert len(content) >= fed - FakeDetectors.max_len - 5 > 0


def test_placeholder_not_split_when_restoring() -> None:
    s = Session()
    Masker(FakeDetectors()).mask_text("ann@example.com", s, {})
    sm, _ = make(restore=True, session=s, hold=0)
    out, _ = run(sm, chat_stream("a [EMAIL_1] b", 1), seed=0, max_chunk=3)
    assert chat_text(out)[0] == "a ann@example.com b"


def test_crlf_events_split_between_cr_and_lf() -> None:
    sm, _ = make()
    raw = sse([(None, {"choices": [{"index": 0, "delta": {"content": "ann@example.com"}}]}),
               (None, "[DONE]")], eol="\r\n")
    out = []
    for i in range(len(raw)):  # one byte at a time
        out += sm(raw[i:i + 1])
    out += sm(b"")
    assert chat_text(b"".join(out))[0] == "[EMAIL_1]"


def test_comments_and_unknown_events_pass() -> None:
    sm, _ = make()
    raw = (b": keep-alive\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\n"
           b"data: plain ann@example.com\n\n")
    out = b"".join(sm(raw)) + b"".join(sm(b""))
    assert out == b": keep-alive\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\n" \
                  b"data: plain [EMAIL_1]\n\n"


def test_unterminated_last_event_is_masked_at_end() -> None:
    sm, _ = make()
    assert sm(b"data: ann@example.com") == []
    assert b"".join(sm(b"")) == b"data: [EMAIL_1]\n\n"
    assert sm(b"") == []


@pytest.mark.parametrize("enc", ["gzip", "deflate", "br", "zstd"])
def test_compressed_stream(enc: str) -> None:
    import brotli
    import zstandard
    raw = chat_stream(TEXT, 3)
    comp = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
            "zstd": zstandard.ZstdCompressor().compress}[enc](raw)
    sm, _ = make(decoder=StreamDecoder(enc))
    out, _ = run(sm, comp, seed=4, max_chunk=50)
    assert chat_text(out)[0].startswith("Sure. Contact [EMAIL_1]")


def test_event_without_end_is_bounded() -> None:
    sm, _ = make(max_event=1000)
    with pytest.raises(StreamTooLarge):
        sm(b"data: " + b"a" * 2000)


def test_logprobs_dropped_and_legacy_function_call_masked() -> None:
    sm, _ = make()
    base = {"object": "chat.completion.chunk"}
    raw = sse([
        (None, {**base, "choices": [{"index": 0, "delta": {"content": "ann@"},
                                     "logprobs": {"content": [{"token": "ann@"}]}}]}),
        (None, {**base, "choices": [{"index": 0, "delta": {"content": "example.com"},
                                     "logprobs": {"content": [{"token": "example.com"}]}}]}),
        (None, {**base, "choices": [{"index": 0, "delta": {
            "function_call": {"name": "f", "arguments": '{"to": "bob@exa'}}}]}),
        (None, {**base, "choices": [{"index": 0, "delta": {
            "function_call": {"arguments": 'mple.com"}'}}}]}),
        (None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        (None, "[DONE]")])
    out, _ = run(sm, raw, seed=5)
    assert b"ann@" not in out and b"bob@" not in out and b"token" not in out
    args = "".join(json.loads(ev.data)["choices"][0]["delta"].get("function_call", {})
                   .get("arguments", "") for ev in events(out) if ev.data != "[DONE]")
    assert json.loads(args) == {"to": "[EMAIL_2]"}


# ---------------------------------------------------------------- restore: the masked copy
def _agent_sent(*values: str) -> Session:
    s = Session()
    m = Masker(FakeDetectors())
    for v in values:
        m.mask_text(v, s, {})
    return s


@pytest.mark.parametrize("kind", ["chat", "anthropic", "responses", "text"])
def test_restored_stream_keeps_a_masked_copy_without_originals(kind: str) -> None:
    s = _agent_sent("ann@example.com")
    s._restore["[EMAIL_1]"] = 'ann"q@example.com'  # escaping differs between the two
    sm, found = make(restore=True, session=s)
    text = "Hi [EMAIL_1], meet eve@example.com and [EMAIL_1]!"
    args = json.dumps({"to": "[EMAIL_1]"})
    raw = {"chat": lambda: chat_stream(text, 3, tool_args=args),
           "anthropic": lambda: anthropic_stream(text, 3, json_args=args),
           "responses": lambda: responses_stream(text, 3),
           "text": lambda: b"data: plain [EMAIL_1] and eve@example.com\n\n"}[kind]()
    out, _ = run(sm, raw, seed=2)
    copy = sm.masked_copy()
    assert sm.restored and copy is not None
    assert b"ann" in out and b"eve@" not in out  # the agent gets its own value back only
    assert b"ann" not in copy and b"eve@" not in copy
    assert b"[EMAIL_1]" in copy and b"[EMAIL_2]" in copy
    if kind == "chat":  # the same stream, with the placeholders kept
        assert chat_text(copy) == ("Hi [EMAIL_1], meet [EMAIL_2] and [EMAIL_1]!", args)
        content, got_args = chat_text(out)
        assert content == 'Hi ann"q@example.com, meet [EMAIL_2] and ann"q@example.com!'
        assert json.loads(got_args) == {"to": 'ann"q@example.com'}
        assert found == {"EMAIL": {"count": 1, "strategy": "placeholder"}}  # counted once


def test_no_masked_copy_without_restore_and_bounded_with_it() -> None:
    sm, _ = make()
    run(sm, chat_stream("Hi [EMAIL_1]", 2))
    assert sm.masked_copy() is None and not sm.restored
    s = _agent_sent("ann@example.com")
    sm, _ = make(restore=True, session=s, max_masked_copy=300)
    out, _ = run(sm, chat_stream("Hi [EMAIL_1]. " * 40, 4))
    copy = sm.masked_copy()
    assert out.count(b"ann@example.com") == 40
    assert copy is not None and b"ann@" not in copy
    assert len(copy) < 400 and b"masked copy truncated at" in copy

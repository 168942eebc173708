"""SSE read exactly as the WHATWG event-stream parser reads it (issue 11, class 7): line
endings CR / LF / CRLF and mixes, BOM, comments and every field, events cut at any byte;
streams of no known dialect (plain text, unknown JSON shapes, legacy completions) masked
as text channels with hold-back."""

from __future__ import annotations

import json
import random

import pytest

from addons.masking.bodies import Masked
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session
from addons.masking.sse import EventSplitter, StreamMasker

DS = DetectorSet()
CARD = "4111 1111 1111 1111"
EMAIL = "ann.lee@example.com"
SSN = "536-22-4519"
RAW = [CARD, "4111", EMAIL, "ann.lee", SSN, "4519"]


def new_masker(restore: bool = False) -> StreamMasker:
    ctx = Masked(Masker(DS, b"k"), Session(), {}, restorable=False, restore=restore,
                 dialect="generic")
    return StreamMasker(ctx)


def run(raw: bytes, seed: int = 0, cut: int | None = None) -> bytes:
    sm = new_masker()
    rnd = random.Random(seed)
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        n = cut or rnd.randint(1, 7)
        out += sm(raw[i:i + n])
        i += n
    out += sm(b"")
    return b"".join(out)


def clean(out: bytes) -> None:
    text = out.decode("utf-8", "replace")
    for v in RAW:
        assert v not in text, (v, text)


def parse(out: bytes) -> list[dict]:
    """Events as a WHATWG client sees them (the output is LF-only by construction)."""
    assert b"\r" not in out
    events = []
    for block in out.decode().split("\n\n"):
        ev: dict = {"data": []}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            f, _, v = line.partition(":")
            ev.setdefault(f, [])
            ev[f].append(v[1:] if v.startswith(" ") else v)
        if ev["data"]:
            events.append(ev)
    return events


# ---------------------------------------------------------------- framing
@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("blank", ["\n", "\r\n", "\r"])
def test_every_line_end_pair_ends_events(eol: str, blank: str) -> None:
    raw = (f"data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"card {CARD}\"}}}}]}}"
           f"{eol}{blank}data: [DONE]{eol}{blank}").encode()
    for cut in (1, 2, 3, None):
        out = run(raw, cut=cut)
        clean(out)
        assert b"[CREDIT_CARD_1]" in out


def test_lf_cr_lf_does_not_run_events_together() -> None:
    # '\n\r\n' is a line end followed by a blank line: two events, both masked
    raw = (f"data: {EMAIL}\n\r\ndata: second {SSN}\n\r\n").encode()
    out = run(raw, cut=1)
    clean(out)


def test_splitter_reads_mixed_endings_like_a_browser() -> None:
    sp = EventSplitter(1 << 20)
    raw = b"\xef\xbb\xbfdata: a\r\rdata: b\n\r\ndata: c\r\n\ndata: d\r"
    out = []
    for i in range(len(raw)):
        out += sp.feed(raw[i:i + 1])
    out.append(sp.rest())
    assert [o for o in out if o != b"\n"] == [b"data: a\n\n", b"data: b\n\n", b"data: c\n\n",
                                             b"data: d\n\n"]


def test_bom_at_stream_start_is_not_part_of_the_field_name() -> None:
    raw = b"\xef\xbb\xbf" + f"data: pay {CARD} now\n\n".encode()
    for cut in (1, 2, 4, None):
        out = run(raw, cut=cut)
        clean(out)
        assert not out.startswith(b"\xef\xbb\xbf")


@pytest.mark.parametrize("line", [f": note {CARD}", f"id: {SSN}", f"event: {EMAIL}",
                                  f"retry: {CARD}", f"x-custom: {EMAIL}", f"{CARD}"])
def test_comments_and_every_field_are_masked(line: str) -> None:
    raw = f"{line}\ndata: hello\n\n{line}\n\n".encode()
    out = run(raw, cut=3)
    clean(out)


# ---------------------------------------------------------------- streams of no known dialect
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("value", [CARD, EMAIL, SSN])
def test_plain_text_tokens_split_across_events(seed: int, value: str) -> None:
    text = f"Sure, the value is {value} as requested."
    rnd = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        n = rnd.randint(1, 4)
        pieces.append(text[i:i + n])
        i += n
    raw = "".join(f"data: {p}\n\n" for p in pieces).encode()
    out = run(raw, seed=seed)
    clean(out)
    joined = "".join("\n".join(e["data"]) for e in parse(out))
    assert joined.replace("[", "").startswith("Sure, the value is ")


@pytest.mark.parametrize("shape", ["ollama_chat", "ollama_generate", "custom", "legacy"])
@pytest.mark.parametrize("value", [CARD, EMAIL, SSN])
def test_unknown_json_shapes_split_across_events(shape: str, value: str) -> None:
    text = f"Here: {value} ok"
    def wrap(p: str) -> dict:
        if shape == "ollama_chat":
            return {"model": "llama3", "message": {"role": "assistant", "content": p},
                    "done": False}
        if shape == "ollama_generate":
            return {"model": "llama3", "response": p, "done": False}
        if shape == "legacy":
            return {"id": "c", "object": "text_completion", "choices": [
                {"index": 0, "text": p, "finish_reason": None}]}
        return {"seq": 1, "payload": {"token": p}}
    raw = "".join(f"data: {json.dumps(wrap(text[i:i + 3]))}\n\n"
                  for i in range(0, len(text), 3)).encode()
    out = run(raw, cut=5)
    clean(out)
    for ev in parse(out):
        json.loads("\n".join(ev["data"]))  # every event is still valid JSON


def test_value_split_across_events_and_chunks_at_every_byte() -> None:
    text = f"call me, card {CARD}, mail {EMAIL}."
    raw = "".join(f"data: {text[i:i + 2]}\r\n\r\n" for i in range(0, len(text), 2)).encode()
    out = run(raw, cut=1)
    clean(out)


def test_unknown_shape_with_restore_keeps_originals_out_of_the_masked_copy() -> None:
    sm = new_masker(restore=True)
    sess = sm.ctx.session
    ph = sess.placeholder("EMAIL", EMAIL, True)  # the agent's own value, masked earlier
    raw = "".join(
        f"data: {json.dumps({'model': 'llama3', 'note': ph, 'message': {'content': p}})}\n\n"
        for p in [f"hi {ph} ", "and more ", "text"]).encode()
    out = b"".join(sm(raw)) + b"".join(sm(b""))
    assert EMAIL.encode() in out  # restored for the agent
    copy = sm.masked_copy()
    assert copy is not None and EMAIL.encode() not in copy and ph.encode() in copy

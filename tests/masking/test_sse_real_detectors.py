"""Incremental SSE masking with the real detector engine (its hold-back estimate)."""

from __future__ import annotations

import json
import random

import pytest

from addons.masking.bodies import Masked
from addons.masking.detectors import SAMPLES, DetectorSet
from addons.masking.masker import Masker, Session
from addons.masking.sse import StreamMasker
from tests.masking.test_sse import anthropic_stream, chat_stream, chat_text, events, run

DETECTORS = DetectorSet()
PROSE = ("Thanks for reaching out about the March invoice. The refund was approved and "
         "should appear within five business days. ")


def masker_pair(restore: bool = False) -> tuple[StreamMasker, Masked]:
    m = Masker(DETECTORS, b"k")
    stream = StreamMasker(Masked(m, Session(), {}, restorable=False, restore=restore,
                                 dialect="openai"))
    whole = Masked(m, Session(), {}, restorable=False, dialect="openai")
    return stream, whole


@pytest.mark.parametrize("entity", sorted(SAMPLES))
@pytest.mark.parametrize("seed", range(3))
def test_every_entity_split_anywhere_equals_whole_text_masking(entity: str, seed: int) -> None:
    rnd = random.Random(seed)
    value = SAMPLES[entity]
    text = PROSE + "Here it is: " + value + " and that is all. " + PROSE
    stream, whole = masker_pair()
    raw = chat_stream(text, rnd.randint(1, 9))
    out, _ = run(stream, raw, seed=seed, max_chunk=rnd.randint(1, 40))
    got, _ = chat_text(out)
    assert got == whole.text(text)
    assert f"[{entity}_1]" in got
    core = value.split("=")[-1].strip()  # the AWS sample carries its context word
    for part in (core[:12], core[-12:]):
        assert part not in out.decode(), (entity, part)


def test_prose_is_emitted_with_a_few_characters_of_lag() -> None:
    """Time to first token: text leaves as it comes, not after max_len characters."""
    stream, _ = masker_pair()
    assert DETECTORS.max_len > 10_000  # holding max_len back would buffer whole answers
    text = PROSE * 20
    raw = chat_stream(text, 4)
    parts = raw.split(b"\n\n")
    emitted = ""
    fed = 0
    lags = []
    for p in parts[1:-3]:  # content deltas
        fed += len(json.loads(p[6:])["choices"][0]["delta"]["content"])
        emitted += chat_text(b"".join(stream(p + b"\n\n")))[0]
        lags.append(fed - len(emitted))
    assert max(lags) <= 16, max(lags)
    assert emitted == text[:len(emitted)]


def test_private_key_streamed_never_leaks() -> None:
    key = SAMPLES["PRIVATE_KEY"]
    stream, _ = masker_pair()
    out, _ = run(stream, anthropic_stream("key:\n" + key + "\nend", 3), seed=7, max_chunk=5)
    text = "".join(json.loads(ev.data).get("delta", {}).get("text", "")
                   for ev in events(out))
    assert "MIIE" not in out.decode() and "KZXI=" not in out.decode()
    assert text == "key:\n[PRIVATE_KEY_1]\nend"


def test_restore_with_real_detectors() -> None:
    m = Masker(DETECTORS, b"k")
    s = Session()
    Masked(m, s, {}, dialect="openai").text("I am jane.doe@example.com")
    stream = StreamMasker(Masked(m, s, {}, restorable=False, restore=True, dialect="openai"))
    out, _ = run(stream, chat_stream("Hello [EMAIL_1], and bob@example.org too.", 2), seed=1)
    assert chat_text(out)[0] == "Hello jane.doe@example.com, and [EMAIL_2] too."

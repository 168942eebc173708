"""The stream callable's two paths give the same bytes: chunks whose masking is heavy are
handed out as jobs (run in a worker thread, as the HTTP layer's hook does) and the layer's
call hands back what the job computed; light chunks are masked in the call. Compared with
the same stream masked wholly in the calls, with and without an earlier stream function
(the mcp addon's), and an error in either aborts (fail closed)."""

from __future__ import annotations

import json
import threading

import pytest
from mitmproxy.test import tflow

from addons.masking.addon import LOOP_BUDGET_US, _SafeStream
from addons.masking.bodies import Masked
from addons.masking.masker import Masker, Session
from addons.masking.sse import StreamMasker
from tests.masking.test_sse_real_detectors import DETECTORS


def _event(text: str) -> bytes:
    return ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})
            + "\n\n").encode()


BIG = " ".join(f"user{i}.x@example.com" for i in range(3000))
CHUNKS = [_event("hello ann@example.com "), *(lambda b: [b[i:i + 16384] for i in
                                                        range(0, len(b), 16384)])(_event(BIG)),
          _event(" card 4111 1111 1111 1111 bye"), b"data: [DONE]\n\n"]


def _stream(before=None) -> tuple[_SafeStream, dict]:
    found: dict = {}
    m = StreamMasker(Masked(Masker(DETECTORS, b"k"), Session(), found, restorable=False,
                            dialect="openai"))
    return _SafeStream(m, tflow.tflow(resp=True), found, before), found


def _drive(s: _SafeStream, offload: bool) -> tuple[bytes, int]:
    """Feed CHUNKS then the end, as the wrapped layer does (offload) or as mitmproxy's
    own layer does; returns (output, jobs run in a thread)."""
    out, jobs = bytearray(), 0
    for data in [*CHUNKS, b""]:
        if offload:
            job = s.agentgate_offload(data)
            if job is not None:
                jobs += 1
                t = threading.Thread(target=job.run)
                t.start()
                t.join()
        got = s(data)
        out += b"".join(got) if isinstance(got, list) else got
    return bytes(out), jobs


def _upper_before():
    def before(data: bytes) -> list[bytes]:
        return [data.replace(b"hello", b"HELLO")]
    return before


@pytest.mark.parametrize("with_before", [False, True])
def test_offloaded_chunks_give_the_same_bytes(with_before: bool) -> None:
    ref, ref_found = _stream(_upper_before() if with_before else None)
    expected, none = _drive(ref, offload=False)
    assert none == 0
    s, found = _stream(_upper_before() if with_before else None)
    got, jobs = _drive(s, offload=True)
    assert got == expected and found == ref_found
    assert jobs >= 2  # the big event's chunks (and its completion) went to threads
    assert b"@example.com" not in got and b"4111" not in got
    assert (b"HELLO" in got) is with_before


def test_light_chunks_stay_in_the_call() -> None:
    s, _ = _stream()
    for data in (_event("hi there"), b"data: [DONE]\n\n", b""):
        assert s.agentgate_offload(data) is None
        s(data)
    assert LOOP_BUDGET_US > 0


def test_errors_abort_the_stream_in_either_path() -> None:
    def broken(data: bytes) -> list[bytes]:
        raise ValueError("judge refused")

    s, _ = _stream(broken)
    assert s.agentgate_offload(CHUNKS[0]) is None
    with pytest.raises(ValueError):
        s(CHUNKS[0])

    s, _ = _stream()
    s.masker.splitter.max_event = 1000  # the big event is over the masker's limit
    first = s.agentgate_offload(CHUNKS[0])
    assert first is None
    s(CHUNKS[0])
    job = s.agentgate_offload(CHUNKS[1])
    assert job is not None
    job.run()
    with pytest.raises(RuntimeError, match="stream aborted"):
        s(CHUNKS[1])

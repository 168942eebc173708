"""Heavy masking work is counted against the flow's identity (frame/offload.py): when that
identity's queue is full its request is refused at once, in its dialect, with Retry-After
and a recorded refusal; another identity's request waits its turn and is masked.

Through the real masking addon and detectors, and a real FairPool (smaller bounds) whose
one slot is held by a job of alice's."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addons.frame import offload
from addons.frame.offload import FairPool, flow_key
from tests.hostile.test_fastpaths3_inline import _addon
from tests.masking.test_addon import flow

ADDRESSES = " ".join(f"user{i}.x@example.com" for i in range(700))  # heavy: a thread


def test_a_full_identity_queue_refuses_in_dialect_and_others_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = FairPool(total=1, per_key=1, queue_per_key=1, queue_total=8)
    monkeypatch.setattr(offload, "POOL", pool)
    m = _addon(tmp_path)
    body = {"model": "m", "messages": [{"role": "user", "content": ADDRESSES}]}
    alice1, alice2 = flow("openai", body, sub="alice"), flow("openai", body, sub="alice")
    bob = flow("openai", body, sub="bob")
    gate = threading.Event()

    async def main() -> None:
        # alice's slot is taken and one more of hers queued: her queue (1) is full
        held = asyncio.create_task(pool.run(flow_key(alice1), gate.wait, 10))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(m.request(alice1))
        await asyncio.sleep(0.05)
        assert pool.running == 1 and pool.queued == 1
        await m.request(alice2)  # refused at once, not queued
        later = asyncio.create_task(m.request(bob))
        await asyncio.sleep(0.05)
        assert not later.done() and pool.queued == 2  # bob waits his turn, not refused
        gate.set()
        await asyncio.gather(held, queued, later)

    with taddons.context(m):
        for f in (alice1, alice2, bob):
            m.requestheaders(f)
        asyncio.run(main())

    assert alice2.response is not None and alice2.response.status_code == 429
    err = json.loads(alice2.response.content)["error"]  # OpenAI's error shape
    assert "queued for this identity" in err["message"]
    assert alice2.response.headers["retry-after"] == "1"
    assert alice2.metadata["refusal"]["code"] == "busy"
    assert alice2.metadata["refusal"]["step"] == "masking"
    assert b"@example.com" in alice2.request.content  # never forwarded: it has a response
    for f in (alice1, bob):  # masked once their turn came
        assert f.response is None
        assert b"@example.com" not in f.request.content
    assert pool.running == 0 and pool.queued == 0 and pool.refused == 1

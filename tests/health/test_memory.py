"""addons/health/memory.py: a flow's decoded bodies are let go as soon as no step reads
them, while the flow itself is still alive (mitmproxy frees finished flows only in the
cyclic GC's full collections), and the start-up heap is frozen out of the collector."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from mitmproxy.test import taddons, tflow

from addons import gateway
from addons.frame import decode
from addons.health.memory import Memory

BODY = json.dumps({"model": "gpt-4o-mini",
                   "messages": [{"role": "user", "content": "x" * 4096}]}).encode()


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Only reference counting frees objects here: what a test sees freed was freed by
    the release, not by a collection that happened to run."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _flow(resp: bool = False):
    f = tflow.tflow(resp=resp)
    f.request.headers["content-type"] = "application/json"
    f.request.content = BODY
    if resp:
        f.response.headers["content-type"] = "application/json"
        f.response.content = BODY
    return f


def test_request_hook_frees_the_decoded_request_while_the_flow_lives() -> None:
    with no_cyclic_gc(), taddons.context():
        f = _flow()
        body = decode.request_body(f)
        assert body is not None and body.json["model"] == "gpt-4o-mini"
        ref = weakref.ref(body)
        del body
        assert ref() is not None, "the per-flow cache holds the decoded body"
        Memory().request(f)
        assert ref() is None, "the decoded request outlived the request hooks"
        # a late reader decodes again, the same value
        assert decode.request_body(f).json == json.loads(BODY)


def test_response_hook_frees_request_and_response() -> None:
    with no_cyclic_gc(), taddons.context():
        f = _flow(resp=True)
        refs = [weakref.ref(decode.request_body(f)), weakref.ref(decode.response_body(f))]
        assert all(r() is not None for r in refs)
        Memory().response(f)
        assert [r() for r in refs] == [None, None]


def test_error_hook_frees_everything() -> None:
    with no_cyclic_gc(), taddons.context():
        f = _flow(resp=True)
        ref = weakref.ref(decode.response_body(f))
        Memory().error(f)
        assert ref() is None


def test_request_release_keeps_the_response() -> None:
    # the request hook only lets go of the request: a response decoded earlier (a flow
    # answered by a step) is still there for the response hooks
    with no_cyclic_gc(), taddons.context():
        f = _flow(resp=True)
        ref = weakref.ref(decode.response_body(f))
        Memory().request(f)
        assert ref() is not None


def test_memory_is_the_last_addon() -> None:
    # every step that reads a body runs before the release, on every hook
    addons = gateway.build()
    assert isinstance(addons[-1], Memory)
    assert sum(isinstance(a, Memory) for a in addons) == 1


def test_running_freezes_the_startup_heap() -> None:
    gc.unfreeze()
    try:
        m = Memory()
        m.running()
        # a frozen object can still be freed by its reference count (another thread's, a
        # cache entry's), so the count may only have gone down a little since
        assert m.frozen > 1000 and m.frozen - 1000 <= gc.get_freeze_count() <= m.frozen
    finally:
        gc.unfreeze()


class _Held:
    """Stands in for what a finished flow keeps alive; weakref-able."""


def _dead_cycle() -> weakref.ref:
    """A reference cycle no one refers to any more (as mitmproxy's finished HTTP streams
    and their flows): only the cyclic GC frees it."""
    held = _Held()
    held.me = held
    ref = weakref.ref(held)
    del held
    return ref


def test_finished_flows_are_collected_by_body_bytes() -> None:
    with no_cyclic_gc(), taddons.context():
        m = Memory(collect_bytes=3 * len(BODY))  # request + response: 2 bodies a flow
        ref = _dead_cycle()
        m.response(_flow(resp=True))
        assert ref() is not None and m.collections == 0 and m.pending == 2 * len(BODY)
        m.error(_flow(resp=True))  # over the budget: collected
        assert ref() is None and m.collections == 1 and m.pending == 0


def test_small_flows_do_not_collect() -> None:
    with no_cyclic_gc(), taddons.context():
        m = Memory()
        ref = _dead_cycle()
        for _ in range(50):
            m.response(_flow(resp=True))
        assert ref() is not None and m.collections == 0


def test_collection_runs_after_the_hook_on_the_loop() -> None:
    async def main() -> None:
        m = Memory(collect_bytes=1)
        ref = _dead_cycle()
        m.response(_flow(resp=True))
        # not inside the hook: the flow's answer is not held up by it
        assert ref() is not None and m.scheduled
        m.response(_flow(resp=True))  # one collection scheduled at a time
        await asyncio.sleep(0)
        assert ref() is None and m.collections == 1 and not m.scheduled

    with no_cyclic_gc(), taddons.context():
        asyncio.run(main())


def test_next_collection_waits_fifty_times_the_last_ones_duration() -> None:
    # a large heap (mitmweb keeps every flow) makes a collection slow: the collections'
    # share of a core stays bounded however large it gets
    now = [100.0]

    def clock() -> float:
        now[0] += 0.01  # every reading 10 ms later: the collection "took" 10 ms
        return now[0]

    with no_cyclic_gc(), taddons.context():
        m = Memory(collect_bytes=1, clock=clock)
        m.response(_flow(resp=True))
        assert m.collections == 1
        ref = _dead_cycle()
        m.response(_flow(resp=True))  # over the budget, but only ~20 ms later
        assert m.collections == 1 and ref() is not None
        now[0] += 0.5  # past 51 x 10 ms
        m.response(_flow(resp=True))
        assert m.collections == 2 and ref() is None


def test_running_again_frees_what_the_last_freeze_kept() -> None:
    # a script reload runs `running` again: the old addons, frozen at the first one, are
    # garbage now and must not be kept for good
    gc.unfreeze()
    try:
        with no_cyclic_gc():
            held = _Held()
            held.me = held
            ref = weakref.ref(held)
            m = Memory()
            m.running()  # frozen while alive
            del held
            gc.collect()
            assert ref() is not None, "frozen: no collection frees it"
            m.running()
            assert ref() is None
    finally:
        gc.unfreeze()


def test_a_collection_gives_the_freed_heap_back() -> None:
    """After each full collection the heap is trimmed (glibc malloc_trim): the bodies the
    collection freed leave holes that would stay resident. Off the loop in a worker thread
    when a loop runs; here too without one."""
    m = Memory()
    if not m.trimmer.available:
        return  # not glibc: nothing to trim with
    m.collect()
    assert (m.collections, m.trimmer.trims) == (1, 1)

    async def on_the_loop() -> None:
        m.collect()
        for _ in range(200):  # the worker thread's trim
            if m.trimmer.trims == 2:
                return
            await asyncio.sleep(0.01)

    asyncio.run(on_the_loop())
    assert (m.collections, m.trimmer.trims) == (2, 2)


def _clean_kib(fragment: str) -> int:
    from pathlib import Path

    from addons.frame.pages import smaps_blocks
    return sum(f.get("Rss", 0) for head, f in smaps_blocks(Path("/proc/self/smaps").read_text())
               if len(p := head.split()) >= 6 and fragment in p[5] and "w" not in p[1]
               and not f.get("Anonymous"))


def test_the_first_collection_drops_what_the_first_flows_faulted_in() -> None:
    """The pages the first flows' one-time work faults in after `running` (here: an SSL
    context's set-up in libssl/libcrypto) are dropped again at the first collection only."""
    import ssl
    m = Memory()
    ssl.create_default_context()
    before = _clean_kib("libssl")
    if not before:
        return  # no separate libssl mapped here
    m.collect()
    assert _clean_kib("libssl") < before, before
    assert m.dropped_kib > 0
    ssl.create_default_context()
    dropped = m.dropped_kib
    m.collect()  # the second one does not drop again
    assert m.dropped_kib == dropped


def _finished_flow_in(memory: Memory):  # noqa: ANN202
    memory.running()
    f = _flow(resp=True)
    memory.response(f)
    return f


def test_mitmdump_lets_a_finished_flows_request_body_go() -> None:
    """After every hook read it (the recorder's snapshot, mitmproxy's `save` before the
    script), a finished flow's request body is not kept while the flow waits, dead, for a
    collection; the response still goes out whole."""
    m = Memory()
    with taddons.context(m):
        f = _finished_flow_in(m)
        assert f.request.raw_content is None
        assert f.response.raw_content == BODY
        e = _flow()
        e.error = tflow.terr()
        m.error(e)
        assert e.request.raw_content is None


def test_request_bodies_stay_where_flows_are_shown_or_asked_for() -> None:
    from mitmproxy.addons.view import View

    m = Memory()
    with taddons.context(m, View()):  # mitmweb, mitmproxy's console
        assert _finished_flow_in(m).request.raw_content == BODY
    m = Memory()
    with taddons.context(m) as tctx:
        tctx.configure(m, agentgate_keep_request_bodies=True)
        assert _finished_flow_in(m).request.raw_content == BODY
    m = Memory()
    with taddons.context(m):
        m.running()
        ws = tflow.twebsocketflow()  # recorded again at its end: left whole
        ws.request.content = b"hello"
        m.response(ws)
        assert ws.request.raw_content == b"hello"

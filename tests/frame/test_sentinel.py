"""The pipeline sentinel remembers "the pipeline is in the chain" only while nothing that
could change the answer happened: a reload that fails after load() must still close."""

from __future__ import annotations

import types

from mitmproxy.test import taddons, tflow

from addons.frame import sentinel


class Pipeline:
    agentgate_pipeline = True


class ScriptLike:
    """Like mitmproxy's Script addon: its children are `[ns]` while a module is loaded."""

    def __init__(self) -> None:
        self.name = "scriptlike"
        self.ns: types.SimpleNamespace | None = None

    @property
    def addons(self) -> list:
        return [self.ns] if self.ns else []


def refused(s: sentinel.PipelineSentinel) -> bool:
    f = tflow.tflow()
    s.requestheaders(f)
    return f.response is not None and f.response.status_code == 503 \
        and b"pipeline_not_loaded" in f.response.content


def test_reload_failing_after_load_closes_even_with_a_remembered_answer() -> None:
    with taddons.context() as tctx:
        master = tctx.master
        s = sentinel.attach(master)
        script = ScriptLike()
        master.addons.add(script)
        script.ns = types.SimpleNamespace(addons=[Pipeline()])
        s.loaded += 1
        assert not refused(s)
        assert not refused(s)  # answered from memory now
        # mitmproxy's Script.loadscript on a changed file: the old module is removed
        # (done: loaded - 1), the new one registered and load()ed (loaded + 1) and then
        # fails (an OptionsError while applying deferred options): never in the chain.
        # The count and the top-level chain are exactly as before.
        chain_before = (id(master.addons.chain), len(master.addons.chain))
        script.ns = None
        s.loaded -= 1
        s.loaded += 1
        assert (id(master.addons.chain), len(master.addons.chain)) == chain_before
        assert refused(s)
        assert refused(s)  # a missing pipeline is never remembered
        script.ns = types.SimpleNamespace(addons=[Pipeline()])
        s.loaded += 0  # the next successful load() bumps the count again
        assert not refused(s)


def test_chain_change_is_checked_again() -> None:
    with taddons.context() as tctx:
        master = tctx.master
        s = sentinel.attach(master)
        holder = types.SimpleNamespace(name="holder", addons=[Pipeline()])
        master.addons.add(holder)
        s.loaded += 1
        assert not refused(s)
        master.addons.chain.remove(holder)  # in place: same list object, shorter
        assert refused(s)


def test_no_pipeline_loaded_refuses() -> None:
    with taddons.context() as tctx:
        s = sentinel.attach(tctx.master)
        assert refused(s)

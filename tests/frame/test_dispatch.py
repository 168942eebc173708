"""addons/frame/dispatch.py: mitmproxy's event dispatch made cheaper, exactly the same.

Differential: the same chain (nested containers, sync and async hooks, a hook that raises,
AddonHalt, OptionsError, children changed during the event, a module attribute named like
a hook, a non-callable one) is driven through mitmproxy's own AddonManager methods and through
the replacements; calls, their order and arguments, awaited results and the log must match.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types

import pytest
from mitmproxy import addonmanager, exceptions, hooks, master, options
from mitmproxy.addons import default_addons
from mitmproxy.proxy.layers.http import (
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.test import tflow

from addons.frame import dispatch
from tests.frame.dispatchkit import restore, use  # noqa: F401 - restore is autouse


def run_event(chain: list, event_for) -> str | None:
    """Trigger one event on a fresh manager with `chain`; the OptionsError text, if any."""
    async def go() -> str | None:
        m = master.Master(options.Options())
        m.addons.chain = chain
        try:
            await m.addons.trigger_event(event_for())
        except exceptions.OptionsError as e:
            return str(e)
        finally:
            m._legacy_log_events.uninstall()  # its handler is bound to this loop
        return None
    return asyncio.run(go())


def scenario(halt: bool, options_error: bool) -> tuple[list, list]:
    calls: list = []

    class Rec:
        def __init__(self, name: str, raises: type[BaseException] | None = None,
                     is_async: bool = False) -> None:
            self.name = name
            self.raises = raises
            self.is_async = is_async

        def request(self, flow):
            calls.append((self.name, flow.id))
            if self.raises is not None:
                raise self.raises("boom " + self.name)
            if self.is_async:
                async def later():
                    await asyncio.sleep(0)
                    calls.append((self.name, "awaited"))
                return later()
            return None

    class Grows:
        """Adds a child during its own hook: a walk reads `addons` after the hook."""
        name = "grows"

        def __init__(self) -> None:
            self.addons = [Rec("g1")]

        def request(self, flow):
            calls.append(("grows", flow.id))
            self.addons.append(Rec("g2-added"))

    class WithModule:
        name = "withmodule"
        request = types.ModuleType("request")  # as `from x import request`: skipped

    class Holder:
        def __init__(self, name: str, children: list) -> None:
            self.name = name
            self.addons = children

    nested = Holder("outer", [Rec("o1"), Holder("inner", [Rec("i1", is_async=True),
                                                          Rec("i2", RuntimeError),
                                                          Rec("i3")]), Rec("o2")])
    chain = [Rec("first"), nested, Grows(), WithModule(), Rec("mid", is_async=True)]
    if halt:
        chain.append(Rec("halt", exceptions.AddonHalt))
    if options_error:
        chain.append(Rec("opt", exceptions.OptionsError))
    chain.append(Rec("last"))
    return chain, calls


@pytest.mark.parametrize("halt,options_error", [(False, False), (True, False),
                                                (False, True)])
def test_same_calls_order_and_log(halt, options_error, caplog) -> None:
    results = {}
    for which in ("mitmproxy", "ours"):
        use(which)
        chain, calls = scenario(halt, options_error)
        f = tflow.tflow()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
            raised = run_event(chain, lambda f=f: HttpRequestHook(f))
        results[which] = ([(n, "F" if x == f.id else x) for n, x in calls], raised,
                          [r.getMessage() for r in caplog.records])
    assert results["mitmproxy"] == results["ours"]
    calls, raised, logs = results["ours"]
    # a raising hook ends its top-level addon's subtree (i3, o2), the next addon runs
    assert ("i2", "F") in calls and ("i3", "F") not in calls and ("grows", "F") in calls
    assert ("g2-added", "F") in calls                     # children added during the hook
    assert logs == ["Addon error: boom i2"]
    if halt:
        assert calls[-1] == ("halt", "F")
    if options_error:
        assert raised == "boom opt"


def test_non_callable_hook_attribute_is_an_addon_error(caplog) -> None:
    class Bad:
        name = "bad"
        request = 42

        def __repr__(self) -> str:
            return "bad"

    class After:
        name = "after"
        seen = False

        def request(self, flow):
            After.seen = True

    for which in ("mitmproxy", "ours"):
        use(which)
        After.seen = False
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
            run_event([Bad(), After()], lambda: HttpRequestHook(tflow.tflow()))
        assert After.seen
        assert [r.getMessage() for r in caplog.records] == \
            ["Addon error: Addon handler request (bad) not callable"]


def test_install_is_pinned_and_idempotent(monkeypatch) -> None:
    cls = addonmanager.AddonManager
    use("mitmproxy")
    assert dispatch.check_pins() == []
    with monkeypatch.context() as m:
        m.setattr(dispatch.mitmproxy_version, "VERSION", "13.0.0")
        assert dispatch.install() is False
    assert cls.trigger_event is dispatch.ORIGINAL["trigger_event"]
    assert dispatch.install() is True and dispatch.install() is True
    assert cls.trigger_event is dispatch.trigger_event
    assert cls._iter_hooks is dispatch._iter_hooks


def test_cheaper_than_mitmproxys_own(monkeypatch) -> None:
    """Not a timing target (those live in bench/): the replacement must not be slower on a
    chain like the gateway's (mitmproxy's defaults + a script with ~20 addons)."""
    def cpu(which: str) -> float:
        use(which)

        async def go() -> float:
            m = master.Master(options.Options())
            m.addons.add(*default_addons())
            ns = types.SimpleNamespace(addons=[type(f"A{i}", (), {})() for i in range(20)])
            m.addons.chain.append(types.SimpleNamespace(addons=[ns]))
            f = tflow.tflow(resp=True)
            evs = [HttpRequestHeadersHook(f), HttpRequestHook(f), HttpResponseHeadersHook(f),
                   HttpResponseHook(f)]
            best = float("inf")
            for _ in range(3):
                t = time.process_time()
                for _ in range(200):
                    for e in evs:
                        await m.addons.handle_lifecycle(e)
                best = min(best, time.process_time() - t)
            m._legacy_log_events.uninstall()
            return best
        return asyncio.run(go())

    assert cpu("ours") < cpu("mitmproxy")


def test_lifecycle_hooks_reach_nested_addons() -> None:
    """invoke_addon_sync (script load/reload) walks with the replacement too."""
    use("ours")
    seen = []

    class Leaf:
        def running(self):
            seen.append("leaf")

    async def go() -> None:
        m = master.Master(options.Options())
        holder = types.SimpleNamespace(addons=[types.SimpleNamespace(addons=[Leaf()])])
        m.addons.invoke_addon_sync(holder, hooks.RunningHook())
        m._legacy_log_events.uninstall()
    asyncio.run(go())
    assert seen == ["leaf"]

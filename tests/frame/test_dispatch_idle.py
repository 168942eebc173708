"""frame/dispatch.py's one deliberate skip: mitmproxy's MapLocal.request is not called
while `map_local` is empty (it would only compute pretty_url), and is called — and serves
its files — as soon as an options change gives it replacements (the table is built again
after every `configure`), and stops again when they are removed."""

from __future__ import annotations

import asyncio

from mitmproxy import hooks, master, options
from mitmproxy.addons import default_addons
from mitmproxy.addons.maplocal import MapLocal
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow

from addons.frame import dispatch
from tests.frame.dispatchkit import restore, use  # noqa: F401 - restore is autouse


def _run(tmp_path, which: str) -> list[tuple[str, int | None]]:
    """Request events through a master with mitmproxy's default addons, before, while and
    after map_local names a file; per event: MapLocal.request called?, status served."""
    use(which)
    (tmp_path / "local.txt").write_text("from the local file")
    seen: list[tuple[str, int | None]] = []

    async def go() -> None:
        m = master.Master(options.Options())
        m.addons.add(*default_addons())
        ml = m.addons.get("maplocal")
        assert isinstance(ml, MapLocal)
        real = MapLocal.request
        calls: list[int] = []

        def spy(self, flow):  # noqa: ANN001, ANN202
            calls.append(1)
            return real(self, flow)
        MapLocal.request = spy  # type: ignore[method-assign]
        try:
            for step in ("empty", "set", "set", "cleared"):
                if step == "set" and not ml.replacements:
                    m.options.update(map_local=[f"|example.com/local|{tmp_path / 'local.txt'}"])
                if step == "cleared":
                    m.options.update(map_local=[])
                f = tflow.tflow()
                f.request.url = "http://example.com/local"
                calls.clear()
                await m.addons.handle_lifecycle(HttpRequestHook(f))
                seen.append(("called" if calls else "skipped",
                             f.response.status_code if f.response else None))
        finally:
            MapLocal.request = real  # type: ignore[method-assign]
            m._legacy_log_events.uninstall()

    asyncio.run(go())
    return seen


def test_maplocal_skipped_only_while_it_has_nothing_to_map(tmp_path) -> None:
    ours = _run(tmp_path, "ours")
    assert ours == [("skipped", None), ("called", 200), ("called", 200), ("skipped", None)]
    theirs = _run(tmp_path, "mitmproxy")
    assert theirs == [("called", None), ("called", 200), ("called", 200), ("called", None)]
    # what reached the flow is the same either way
    assert [s for _, s in ours] == [s for _, s in theirs]


def test_the_skip_is_pinned_to_what_maplocal_does() -> None:
    assert dispatch.check_pins() == []
    assert dispatch._idle(MapLocal(), "request")
    assert not dispatch._idle(MapLocal(), "requestheaders")
    busy = MapLocal()
    busy.replacements = [object()]  # type: ignore[list-item]
    assert not dispatch._idle(busy, "request")


# The other skipped hooks: (addon class, hook, the event that calls it, an options change
# that gives the hook something to do). The request events carry a response-less flow,
# the response events one with a response.
_BUSY = {
    "anticache": {"anticache": True},
    "anticomp": {"anticomp": True},
    "onboarding": {"onboarding": True},
    "block_list": {"block_list": ["|~d nowhere.invalid|404"]},
    "map_remote": {"map_remote": ["|nowhere.invalid|x|y"]},
    "modify_body": {"modify_body": ["|~d nowhere.invalid|a|b"]},
    "modify_headers": {"modify_headers": ["|~d nowhere.invalid|x-a|b"]},
    "proxyauth": {"proxyauth": "any"},
    "upstream_auth": {"upstream_auth": "user:pass"},
    "stickyauth": {"stickyauth": "~d nowhere.invalid"},
    "stickycookie": {"stickycookie": "~d nowhere.invalid"},
    "save": {"save_stream_file": "{tmp}/flows.mitm"},
    "hardump": {"hardump": "{tmp}/flows.har"},
    "flow_detail": {"flow_detail": 1},
}
_SKIPPED = [
    ("AntiCache", "request", "anticache"), ("AntiComp", "request", "anticomp"),
    ("Onboarding", "request", "onboarding"), ("BlockList", "request", "block_list"),
    ("MapRemote", "request", "map_remote"), ("ModifyBody", "request", "modify_body"),
    ("ModifyBody", "response", "modify_body"),
    ("ModifyHeaders", "requestheaders", "modify_headers"),
    ("ProxyAuth", "requestheaders", "proxyauth"),
    ("UpstreamAuth", "requestheaders", "upstream_auth"),
    ("StickyAuth", "request", "stickyauth"), ("StickyCookie", "request", "stickycookie"),
    ("Save", "request", "save"), ("Save", "response", "save"), ("Save", "error", "save"),
    ("SaveHar", "response", "hardump"), ("SaveHar", "error", "hardump"),
    ("Dumper", "response", "flow_detail"), ("Dumper", "error", "flow_detail"),
]


def _calls(tmp_path, which: str, busy: str | None) -> dict[tuple[str, str], int]:
    """Fire requestheaders, request, response and error through a master with mitmproxy's
    default addons and the dumper at flow_detail 0 (as the gateway's benchmark runs it)
    and onboarding off (as the gateway forces it), then `busy`'s options set; which hooks
    of _SKIPPED were called, how often."""
    import io

    from mitmproxy import flow as mflow
    from mitmproxy.addons.dumper import Dumper
    from mitmproxy.proxy.layers.http import (
        HttpErrorHook,
        HttpRequestHeadersHook,
        HttpResponseHook,
    )

    use(which)
    calls: dict[tuple[str, str], int] = {}

    async def go() -> None:
        m = master.Master(options.Options())
        m.addons.add(*default_addons(), Dumper(io.StringIO()))
        m.options.update(flow_detail=0, onboarding=False)  # as the gateway (edge.py)
        classes = {type(a).__name__: type(a) for a in m.addons.chain}
        real = {}
        for cls_name, hook, _ in _SKIPPED:
            cls = classes[cls_name]
            fn = real[(cls_name, hook)] = getattr(cls, hook)

            def spy(self, *args, _fn=fn, _k=(cls_name, hook)):  # noqa: ANN001, ANN002, ANN202
                calls[_k] = calls.get(_k, 0) + 1
                return _fn(self, *args)
            setattr(cls, hook, spy)
        try:
            if busy is not None:
                m.options.update(**{k: v.replace("{tmp}", str(tmp_path))
                                    if isinstance(v, str) else v
                                    for k, v in _BUSY[busy].items()})
            f = tflow.tflow()
            await m.addons.handle_lifecycle(HttpRequestHeadersHook(f))
            await m.addons.handle_lifecycle(HttpRequestHook(f))
            f.response = tflow.tresp()
            await m.addons.handle_lifecycle(HttpResponseHook(f))
            g = tflow.tflow()
            g.error = mflow.Error("connection closed")
            await m.addons.handle_lifecycle(HttpErrorHook(g))
        finally:
            for (cls_name, hook), fn in real.items():
                setattr(classes[cls_name], hook, fn)
            await m.addons.trigger_event(hooks.DoneHook())  # Save/SaveHar close files
            m._legacy_log_events.uninstall()

    asyncio.run(go())
    return calls


def test_idle_hooks_of_mitmproxys_addons_are_skipped_and_called_once_busy(tmp_path) -> None:
    every = {(c, h) for c, h, _ in _SKIPPED}
    # mitmproxy's own dispatch calls each of them on every flow
    assert set(_calls(tmp_path, "mitmproxy", None)) == every
    # ours: none while the options give them nothing to do
    assert _calls(tmp_path, "ours", None) == {}
    for busy in _BUSY:
        woken = {(c, h) for c, h, b in _SKIPPED if b == busy}
        got = _calls(tmp_path / busy, "ours", busy)
        # called again as soon as an option gives it something to do, and only those
        assert set(got) == woken, busy
        theirs = _calls(tmp_path / (busy + "-m"), "mitmproxy", busy)
        assert got == {k: n for k, n in theirs.items() if k in woken}, busy


def test_every_skip_is_pinned_and_exact_to_its_class() -> None:
    from mitmproxy.addons.anticache import AntiCache

    assert dispatch.check_pins() == []

    class Mine(AntiCache):  # a subclass may do more than its base: never skipped
        pass
    with taddons_context():
        assert dispatch._idle(AntiCache(), "request")
        assert not dispatch._idle(Mine(), "request")
        assert not dispatch._idle(AntiCache(), "response")


def taddons_context():  # noqa: ANN201
    from mitmproxy.addons.anticache import AntiCache
    from mitmproxy.test import taddons
    return taddons.context(AntiCache())


def test_a_table_is_built_again_for_another_ctx_options() -> None:
    """The option-tested skips read `ctx.options` (where the hooks read them): a second
    master replaces it without any event on the first one's manager; the first one's
    table must not keep a verdict given with the old options."""
    from mitmproxy.addons.anticache import AntiCache

    use("ours")
    calls: list[int] = []

    async def go() -> None:
        m = master.Master(options.Options())
        m.addons.add(*default_addons())
        real = AntiCache.request

        def spy(self, flow):  # noqa: ANN001, ANN202
            calls.append(1)
            return real(self, flow)
        AntiCache.request = spy  # type: ignore[method-assign]
        try:
            await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
            assert calls == []
            other = master.Master(options.Options())  # ctx.options is now its options
            other.addons.add(*default_addons())
            other.options.update(anticache=True)
            f = tflow.tflow()
            f.request.headers["if-none-match"] = "x"
            await m.addons.handle_lifecycle(HttpRequestHook(f))
            assert calls == [1]  # AntiCache reads ctx.options.anticache: True now
            assert "if-none-match" not in f.request.headers
            other._legacy_log_events.uninstall()
        finally:
            AntiCache.request = real  # type: ignore[method-assign]
            m._legacy_log_events.uninstall()

    asyncio.run(go())

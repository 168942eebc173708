"""frame/dispatch.py's one deliberate skip: mitmproxy's MapLocal.request is not called
while `map_local` is empty (it would only compute pretty_url), and is called — and serves
its files — as soon as an options change gives it replacements (the table is built again
after every `configure`), and stops again when they are removed."""

from __future__ import annotations

import asyncio

from mitmproxy import master, options
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

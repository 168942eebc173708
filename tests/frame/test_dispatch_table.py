"""addons/frame/dispatch.py's hook table: never stale, never different from mitmproxy.

The table remembers, per event, which addons have the hook; these tests change the addon
tree every way mitmproxy allows (and ways it merely tolerates) — between events and from
inside hooks, sync and awaited — and demand the very same calls, in the same order, with
the same errors logged, as mitmproxy 12.2's own dispatch. A stale table would skip a
concern (or call a removed one): a real script reload through mitmproxy's ScriptLoader and
an options change that gives an addon a hook are checked explicitly.
"""

from __future__ import annotations

import asyncio
import logging
import random
import types
from pathlib import Path

import pytest
from mitmproxy import addonmanager, exceptions, hooks, master, options
from mitmproxy.addons import script as mitm_script
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from tests.frame.dispatchkit import restore, use  # noqa: F401 - restore is autouse

HOOK_NAMES = ("request", "response", "update", "running")




# ---------------------------------------------------------------- a random addon world
class World:
    """A random addon tree whose hooks record their calls and change the tree.

    Everything is drawn from one seeded RNG in call order, so two runs whose calls agree
    build and change exactly the same trees; the first difference shows in the record."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.calls: list[tuple[str, str]] = []
        self.n = 0
        self.holders: list[Holder] = []
        self.manager: addonmanager.AddonManager | None = None

    def new_name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def leaf(self) -> Leaf:
        # some with an __eq__ of their own: lists holding them are compared one by one
        kind = EqLeaf if self.rng.random() < 0.1 else Leaf
        leaf = kind(self, self.new_name("leaf"))
        for hook in HOOK_NAMES:
            r = self.rng.random()
            if r < 0.45:
                leaf.set_hook(hook, self.behaviour())
            elif r < 0.50:  # as `from x import request` in a module: skipped
                setattr(leaf, hook, types.ModuleType(hook))
        if self.rng.random() < 0.03:
            leaf.request = 42  # not callable: an addon error, as mitmproxy says
        return leaf

    def holder(self, depth: int) -> Holder:
        h = Holder(self, self.new_name("holder"))
        self.holders.append(h)
        h.addons = [self.node(depth + 1) for _ in range(self.rng.randint(0, 4))]
        for hook in HOOK_NAMES:
            if self.rng.random() < 0.3:
                h.set_hook(hook, self.behaviour())
        return h

    def node(self, depth: int = 0) -> object:
        return self.holder(depth) if depth < 3 and self.rng.random() < 0.3 else self.leaf()

    def behaviour(self) -> str:
        return self.rng.choices(["plain", "async", "raise", "halt", "mutate", "mutate_async"],
                                [40, 12, 4, 1, 30, 13])[0]

    def chain(self) -> list:
        return [self.node() for _ in range(self.rng.randint(2, 7))]

    # -- changes, each one a thing some addon or mitmproxy itself does
    def mutate(self) -> None:
        rng = self.rng
        m = self.manager
        assert m is not None
        holders = [h for h in self.holders if h.addons is not None]
        what = rng.choice(["append", "insert", "remove", "replace_list", "replace_one",
                           "chain_append", "chain_insert", "chain_remove", "chain_rebind",
                           "chain_replace_one", "hook_removed", "hook_replaced", "nothing"])
        if what in ("append", "insert", "remove", "replace_list", "replace_one") and holders:
            h = rng.choice(holders)
            if what == "replace_one" and h.addons:
                # in place, same length: only the places the walk passes can tell
                h.addons[rng.randrange(len(h.addons))] = self.node(2)
            elif what == "append":
                h.addons.append(self.node(2))
            elif what == "insert":
                h.addons.insert(rng.randint(0, len(h.addons)), self.node(2))
            elif what == "remove" and h.addons:
                del h.addons[rng.randrange(len(h.addons))]
            elif what == "replace_list":
                new = list(h.addons)
                rng.shuffle(new)
                h.addons = new + ([self.leaf()] if rng.random() < 0.5 else [])
        elif what == "chain_append":
            m.chain.append(self.node())
        elif what == "chain_insert":
            m.chain.insert(rng.randint(0, len(m.chain)), self.node())
        elif what == "chain_replace_one" and m.chain:
            m.chain[rng.randrange(len(m.chain))] = self.node()
        elif what == "chain_remove" and m.chain:
            del m.chain[rng.randrange(len(m.chain))]
        elif what == "chain_rebind" and m.chain:
            # AddonManager.remove: a new list, the running iteration keeps the old one
            victim = rng.choice(m.chain)
            m.chain = [a for a in m.chain if a is not victim]
        elif what in ("hook_removed", "hook_replaced"):
            nodes = list(addonmanager.traverse(m.chain))
            if nodes:
                a = rng.choice(nodes)
                hook = rng.choice(HOOK_NAMES)
                if callable(getattr(a, hook, None)):
                    if what == "hook_removed":
                        setattr(a, hook, None)
                    else:
                        a.set_hook(hook, "plain", tag="replaced")


class Recorder:
    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def set_hook(self, hook: str, behaviour: str, tag: str = "") -> None:
        world, me = self.world, self

        def fn(*args):
            world.calls.append((me.name + tag, hook))
            if behaviour == "raise":
                raise RuntimeError(f"boom {me.name} {hook}")
            if behaviour == "halt":
                raise exceptions.AddonHalt()
            if behaviour == "mutate":
                world.mutate()
            if behaviour in ("async", "mutate_async"):
                async def later():
                    await asyncio.sleep(0)
                    if behaviour == "mutate_async":
                        world.mutate()  # as a script reload while a hook awaits
                    world.calls.append((me.name + tag, hook + " awaited"))
                return later()
            return None
        setattr(self, hook, fn)


class Leaf(Recorder):
    pass


class EqLeaf(Leaf):
    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__


class Holder(Recorder):
    addons: list


def play(seed: int, which: str) -> tuple[list, list[str]]:
    """A world's events through one dispatch: calls, logged errors, raised errors."""
    use(which)
    world = World(seed)
    logs: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logs.append(record.getMessage())

    handler = Catch(logging.ERROR)
    logger = logging.getLogger(addonmanager.__name__)
    logger.addHandler(handler)

    async def go() -> None:
        m = master.Master(options.Options())
        world.manager = m.addons
        m.addons.chain = world.chain()
        try:
            for step in range(14):
                f = tflow.tflow(resp=True)
                kind = world.rng.random()
                try:
                    if kind < 0.4:
                        await m.addons.handle_lifecycle(HttpRequestHook(f))
                    elif kind < 0.75:
                        await m.addons.handle_lifecycle(HttpResponseHook(f))
                    elif kind < 0.85:
                        await m.addons.trigger_event(hooks.RunningHook())
                    else:
                        # a change between events, with no addon event at all
                        world.mutate()
                except exceptions.OptionsError as e:  # never raised here; kept exact
                    logs.append(f"raised {e}")
                world.calls.append(("--", f"event {step}"))
        finally:
            m._legacy_log_events.uninstall()
    try:
        asyncio.run(go())
    finally:
        logger.removeHandler(handler)
    return world.calls, logs


@pytest.mark.parametrize("block", range(8))
def test_random_trees_changed_every_way_same_calls_as_mitmproxy(block: int) -> None:
    """400 random worlds: addons added, inserted, removed and replaced at every level
    (children lists mutated in place — also one addon put in another's place, same
    length — or rebound; the chain mutated or rebound as AddonManager.remove does),
    hooks removed or replaced — between events, from inside
    hooks and while a hook awaits. Calls, order and logged errors equal mitmproxy's."""
    changed = 0
    for seed in range(block * 50, block * 50 + 50):
        theirs = play(seed, "mitmproxy")
        ours = play(seed, "ours")
        assert ours == theirs, f"seed {seed}"
        changed += any(c[1] == "request" for c in theirs[0])
    assert changed > 25  # the worlds do exercise the hooks


def test_the_table_skips_addons_without_the_hook() -> None:
    """The point of the table: the second event does not look at addons that lack it."""
    use("ours")
    looked: list[str] = []

    class Watched:
        def __getattr__(self, name: str):
            looked.append(name)
            raise AttributeError(name)

    class Has:
        def __init__(self) -> None:
            self.n = 0

        def request(self, flow) -> None:
            self.n += 1

    has = Has()

    async def go() -> None:
        m = master.Master(options.Options())
        m.addons.chain = [Watched(), has, Watched()]
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        looked.clear()
        for _ in range(3):
            await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        m._legacy_log_events.uninstall()
    asyncio.run(go())
    assert has.n == 4
    assert looked == []


SCRIPT_V1 = '''
class Concern:
    def request(self, flow):
        flow.metadata.setdefault("seen", []).append("v1")
addons = [Concern()]
'''
SCRIPT_V2 = '''
class Concern:
    def request(self, flow):
        flow.metadata.setdefault("seen", []).append("v2")
class Other:
    def request(self, flow):
        flow.metadata.setdefault("seen", []).append("v2-other")
addons = [Concern(), Other()]
'''
SCRIPT_NONE = "addons = []\n"


def test_a_script_reload_is_seen_at_the_next_flow(tmp_path: Path) -> None:
    """mitmproxy's real ScriptLoader and Script: a reloaded script's addons get the next
    flow, the old ones never again; a script that no longer has the hook is not called."""
    use("ours")
    path = tmp_path / "concern.py"
    path.write_text(SCRIPT_V1)

    async def go() -> list[list[str]]:
        m = master.Master(options.Options())
        loader = mitm_script.ScriptLoader()
        m.addons.add(loader)
        m.options.update(scripts=[str(path)])
        await asyncio.sleep(0.1)  # Script's watcher task loads it
        seen = []

        async def flow() -> None:
            f = tflow.tflow()
            await m.addons.handle_lifecycle(HttpRequestHook(f))
            seen.append(f.metadata.get("seen", []))

        await flow()
        await flow()
        (s,) = loader.addons
        for text in (SCRIPT_V2, SCRIPT_NONE, SCRIPT_V1):
            path.write_text(text)
            s.loadscript()  # what the file watcher does on a change
            await flow()
        m.options.update(scripts=[])  # the script removed from the options
        await flow()
        m._legacy_log_events.uninstall()
        return seen
    assert asyncio.run(go()) == [["v1"], ["v1"], ["v2", "v2-other"], [], ["v1"], []]


def test_a_hook_given_at_configure_is_called() -> None:
    """An options change (configure) may give an addon a hook it did not have: the table
    is rebuilt after every configure, so the next flow reaches it."""
    use("ours")
    calls = []

    class Late:
        def load(self, loader) -> None:
            loader.add_option("late_hook", bool, False, "give Late a request hook")

        def configure(self, updated) -> None:
            if "late_hook" in updated:
                self.request = lambda flow: calls.append("late")

    async def go() -> None:
        m = master.Master(options.Options())
        m.addons.add(Late())
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        assert calls == []
        m.options.update(late_hook=True)
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        m._legacy_log_events.uninstall()
    asyncio.run(go())
    assert calls == ["late"]


def test_added_and_removed_addons_are_seen_at_the_next_flow() -> None:
    use("ours")
    calls = []

    class A:
        def __init__(self, name: str) -> None:
            self.name = name

        def request(self, flow) -> None:
            calls.append(self.name)

    async def go() -> None:
        m = master.Master(options.Options())
        a, b = A("a"), A("b")
        m.addons.add(a)
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        m.addons.add(b)
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        m.addons.remove(a)
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        m._legacy_log_events.uninstall()
    asyncio.run(go())
    assert calls == ["a", "a", "b", "b"]


def test_a_hook_that_raises_is_logged_and_the_next_addon_runs(caplog) -> None:
    """safecall()'s handling, on a table-driven event: the failing subtree stops, the next
    top-level addon runs, the error is logged on mitmproxy's addonmanager logger."""
    use("ours")
    calls = []

    class Boom:
        def request(self, flow) -> None:
            calls.append("boom")
            raise ValueError("bad")

    class After:
        def request(self, flow) -> None:
            calls.append("after")

    async def go() -> None:
        m = master.Master(options.Options())
        m.addons.chain = [types.SimpleNamespace(addons=[Boom(), After()]), After()]
        for _ in range(2):
            await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        m._legacy_log_events.uninstall()
    with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
        asyncio.run(go())
    assert calls == ["boom", "after"] * 2
    assert [r.getMessage() for r in caplog.records] == ["Addon error: bad"] * 2

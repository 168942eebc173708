"""A cheaper, exact event dispatch for mitmproxy 12.2's AddonManager.

Every flow event (requestheaders, request, responseheaders, response, and the `update` that
follows each) goes to the whole addon chain: ~35 of mitmproxy's own top-level addons plus
the script's ~22, 60 addon objects in all, of which 0 (`update`) to 23 (`request`) have the
hook. mitmproxy 12.2 walks every one of them for every event: per top-level addon a
`contextlib` context manager (`safecall`) and a coroutine (`invoke_addon`), one recursive
generator per nesting level (`traverse`; the script's addons sit three levels down), a
`getattr` and a `hasattr(a, "addons")` per addon, and `dataclasses.fields` to rebuild the
event's arguments for every hook it calls.

Here each manager keeps a **hook table**: per event name, the top-level addons whose subtree
has the hook or holds children, and in walk order the addons that have it and the parents
whose children were read (`_Plan`). An event then touches only those; the rest of the walk
costs nothing. Exactly what mitmproxy does, in the same order:
- A hook is looked up again (`getattr`) when it is called, so a hook method replaced,
  removed or made non-callable is seen at once; a module attribute named like the hook is
  skipped, any other non-callable raises AddonManagerError (logged, as `safecall` does).
- Structure: every place mitmproxy's walk passes — each top-level addon's index in the
  chain, each addon's index among its parent's children, the end of each children list,
  each parent's `addons` where the walk reads them (after the parent's own hook) — is
  checked to hold what the table expects at the moment the walk would pass it (a whole
  list is compared at C speed, and not looked at again until some addon code has run).
  On any difference (an addon added, inserted, removed or replaced in the chain or in a
  children list, between events or by a hook during one, or while a hook awaited: a
  script reload) the event goes on with mitmproxy's own walk from exactly where its list
  iterators would be, and the table is rebuilt at the next event.
- A table is rebuilt after any event dispatched outside it: `load` (every register: add,
  script load and reload), `done` (remove), `configure` (every options change), `running`,
  the synchronous `trigger` — all go through `_iter_hooks`, which bumps the manager's
  generation. Not seen until then: a hook (or `addons`) *attribute* given at run time to
  an addon object or its class that did not have one when the table was built, with no
  addon or option change since (neither mitmproxy's addons nor ours do that); and, as
  lists are compared with `==` (identity first) when no addon in them has an `__eq__` of
  its own, an addon put in another's place without register/remove whose own `__eq__`
  calls it equal to the one it replaced.
- Per top-level addon, `AddonHalt` stops the event, `OptionsError` propagates, any other
  exception is logged as "Addon error: ..." on mitmproxy's addonmanager logger (as
  `safecall` does) and the next top-level addon runs.
- `handle_lifecycle`: the event's arguments are built once (mitmproxy builds them twice);
  the `update` that follows a flow event is built only when an addon has the `update` hook
  or the table has parents to check.
- One exception, by design: a hook of mitmproxy's own addons that does nothing under the
  options in force is not called (`_IDLE`): `MapLocal.request` while `map_local` is empty
  (it would only compute `pretty_url`, a strict Host parse with IDNA checks: ~8.5 µs per
  request), and 20 more hooks on every flow that with mitmdump's defaults (and the
  gateway's `onboarding: false`) only read an option or an empty list and return:
  anticache, anticomp, onboarding, block_list, map_remote, modify_body, modify_headers
  (request side), proxyauth, upstream_auth, stickyauth, stickycookie (request side),
  save_stream_file, hardump, and the dumper at flow_detail 0. An option read costs a
  deep copy of its value, twice (OptManager); together ~100k instructions per request.
  What each hook tests changes only through `configure` (every options change; Save's
  stream also at `done`), an event outside the table, so the table built next sees it;
  the options tested are those of `ctx.options`, where the hooks read them, and a table
  built with another `ctx.options` (a second master) is built again. Each hook's source
  is pinned (`_PINS`). Their places in the chain are still checked like any other addon's.
Fail closed is not at stake here: our hooks are `guarded` (an exception refuses the flow),
and an exception that reaches the manager is handled as before. The install is
version-pinned and checks the source of what it replaces; anything unexpected leaves
mitmproxy's own dispatch in place (slower, same behaviour).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import operator
import sys
import types
from collections.abc import Iterator
from typing import Any

from mitmproxy import addonmanager, ctx, exceptions, flow, hooks
from mitmproxy import version as mitmproxy_version
from mitmproxy.addons import (
    anticache,
    anticomp,
    blocklist,
    dumper,
    maplocal,
    mapremote,
    modifybody,
    modifyheaders,
    onboarding,
    proxyauth,
    save,
    savehar,
    stickyauth,
    stickycookie,
    upstream_auth,
)

log = logging.getLogger("agentgate.dispatch")
_manager_log = logging.getLogger(addonmanager.__name__)  # where safecall logs

PINNED_MITMPROXY = "12.2."
# (function, fragment its source must contain) for what the replacements stand in for
_PINS: tuple[tuple[Any, str], ...] = (
    (addonmanager.traverse, "yield from traverse(a.addons)"),
    (addonmanager.safecall, "except (exceptions.AddonHalt, exceptions.OptionsError):"),
    (addonmanager.AddonManager._iter_hooks, "for a in traverse([addon]):"),
    (addonmanager.AddonManager.invoke_addon, "res = func(*event.args())"),
    (addonmanager.AddonManager.trigger_event, "with safecall():"),
    (addonmanager.AddonManager.trigger_event, "await self.invoke_addon(i, event)"),
    (addonmanager.AddonManager.handle_lifecycle, "message = event.args()[0]"),
    (addonmanager.AddonManager.handle_lifecycle,
     "await self.trigger_event(hooks.UpdateHook([message]))"),
    # _IDLE: with no replacements, MapLocal.request computes a URL and nothing else
    (maplocal.MapLocal.request, "for spec in self.replacements:"),
    (maplocal.MapLocal.request, "if all_candidates:"),
    (maplocal.MapLocal.configure, "self.replacements = []"),
    # _IDLE: the other hooks that test an option, a list or an attribute set only by
    # `configure` (Save's stream: also `done`) before they do anything
    (anticache.AntiCache.request, "if ctx.options.anticache:"),
    (anticomp.AntiComp.request, "if ctx.options.anticomp:"),
    (onboarding.Onboarding.request, "if ctx.options.onboarding:"),
    (blocklist.BlockList.request, "for spec in self.items:"),
    (blocklist.BlockList.configure, "self.items = []"),
    (mapremote.MapRemote.request, "for spec in self.replacements:"),
    (mapremote.MapRemote.configure, "self.replacements = []"),
    (modifybody.ModifyBody.request, "self.run(flow)"),
    (modifybody.ModifyBody.response, "self.run(flow)"),
    (modifybody.ModifyBody.run, "for spec in self.replacements:"),
    (modifybody.ModifyBody.configure, "self.replacements = []"),
    (modifyheaders.ModifyHeaders.requestheaders, "self.run(flow, flow.request.headers)"),
    (modifyheaders.ModifyHeaders.run, "for spec in self.replacements:"),
    (modifyheaders.ModifyHeaders.run, "for i, spec in enumerate(self.replacements):"),
    (modifyheaders.ModifyHeaders.configure, "self.replacements = []"),
    (proxyauth.ProxyAuth.requestheaders, "if self.validator:"),
    (proxyauth.ProxyAuth.configure, "self.validator = None"),
    (upstream_auth.UpstreamAuth.requestheaders, "if self.auth:"),
    (upstream_auth.UpstreamAuth.configure, "self.auth = None"),
    (stickyauth.StickyAuth.request, "if self.flt:"),
    (stickyauth.StickyAuth.configure, "self.flt = None"),
    (stickycookie.StickyCookie.request, "if self.flt:"),
    (stickycookie.StickyCookie.configure, "self.flt = None"),
    (save.Save.request, "if self.stream:"),
    (save.Save.response, "self.save_flow(flow)"),
    (save.Save.error, "self.response(flow)"),
    (save.Save.save_flow, "if not self.stream:"),
    (savehar.SaveHar.response, "self._save_flow(flow)"),
    (savehar.SaveHar.error, "self.response(flow)"),
    (savehar.SaveHar._save_flow, "if ctx.options.hardump:"),
    (dumper.Dumper.response, "if self.match(f):"),
    (dumper.Dumper.error, "if self.match(f):"),
    (dumper.Dumper.match, "if ctx.options.flow_detail == 0:"),
)
ORIGINAL = {"_iter_hooks": addonmanager.AddonManager._iter_hooks,
            "trigger_event": addonmanager.AddonManager.trigger_event,
            "handle_lifecycle": addonmanager.AddonManager.handle_lifecycle}

_GEN = "_agentgate_generation"  # manager attribute: bumped by every walk outside a table
_TABLE = "_agentgate_hooks"     # manager attribute: {event name: _Plan}
_CALL, _CHECK, _HELD, _END = 0, 1, 2, 3  # step kinds (_HELD: a _CHECK right after
# the same addon's _CALL, whose place is not looked at again: mitmproxy's walk holds it)
_LEAF: Any = object()  # steps of a top-level addon that is one hook and no children
_isawaitable = inspect.isawaitable
_is = operator.is_
_object_eq = object.__eq__


def _walk(stack: list[Iterator[Any]], name: str) -> Iterator[tuple[Any, Any]]:
    """mitmproxy's `traverse` + hook lookup, from an explicit stack of sibling iterators:
    pre-order, an addon's `addons` read after its own hook ran, as `traverse` reads it."""
    while stack:
        for a in stack[-1]:
            func = getattr(a, name, None)
            if func:
                if callable(func):
                    yield a, func
                elif isinstance(func, types.ModuleType):
                    # as mitmproxy: e.g. `from mitmproxy import log` in an addon module
                    pass
                else:
                    raise exceptions.AddonManagerError(
                        f"Addon handler {name} ({a}) not callable")
            if hasattr(a, "addons"):  # read after its hook ran, as traverse() does
                stack.append(iter(a.addons))
                break
        else:
            stack.pop()


def _iter_hooks(self: addonmanager.AddonManager, addon: Any, event: hooks.Hook
                ) -> Iterator[tuple[Any, Any]]:
    assert isinstance(event, hooks.Hook)
    # Every walk outside the table (load/register, done/remove, configure, running, the
    # synchronous trigger, a script's reload) may come with a change the table cannot see
    # cheaply (a hook gained): the next event builds its table again.
    self.__dict__[_GEN] = self.__dict__.get(_GEN, 0) + 1
    return _walk([iter((addon,))], event.name)


# (mitmproxy addon class, hook): does the addon's hook do nothing now? Asked when a table
# is built; every change that could make it do something is an options change
# (`configure`), after which the table is built again.
def _empty(attr: str) -> Any:
    return lambda a, o: type(getattr(a, attr)) is list and not getattr(a, attr)


def _unset(attr: str) -> Any:
    return lambda a, o: getattr(a, attr) is None


def _off(option: str) -> Any:
    # as the hook tests it (`if ctx.options.X:`), a bool option that is False
    return lambda a, o: o is not None and getattr(o, option) is False


# (addon class, hook) -> (addon, ctx.options) -> does the hook do nothing now?
_IDLE: dict[tuple[type, str], Any] = {
    (maplocal.MapLocal, "request"): _empty("replacements"),
    (anticache.AntiCache, "request"): _off("anticache"),
    (anticomp.AntiComp, "request"): _off("anticomp"),
    (onboarding.Onboarding, "request"): _off("onboarding"),
    (blocklist.BlockList, "request"): _empty("items"),
    (mapremote.MapRemote, "request"): _empty("replacements"),
    (modifybody.ModifyBody, "request"): _empty("replacements"),
    (modifybody.ModifyBody, "response"): _empty("replacements"),
    (modifyheaders.ModifyHeaders, "requestheaders"): _empty("replacements"),
    (proxyauth.ProxyAuth, "requestheaders"): _unset("validator"),
    (upstream_auth.UpstreamAuth, "requestheaders"): _unset("auth"),
    (stickyauth.StickyAuth, "request"): _unset("flt"),
    (stickycookie.StickyCookie, "request"): _unset("flt"),
    (save.Save, "request"): _unset("stream"),
    (save.Save, "response"): _unset("stream"),
    (save.Save, "error"): _unset("stream"),
    (savehar.SaveHar, "response"): lambda a, o: o is not None and o.hardump == "",
    (savehar.SaveHar, "error"): lambda a, o: o is not None and o.hardump == "",
    (dumper.Dumper, "response"): lambda a, o: o is not None and o.flow_detail == 0,
    (dumper.Dumper, "error"): lambda a, o: o is not None and o.flow_detail == 0,
}


def _options() -> Any:
    """The options the skipped hooks read (`ctx.options`), or None before any master."""
    return getattr(ctx, "options", None)


def _idle(addon: Any, name: str, options: Any = None) -> bool:
    """Does `addon`'s hook `name` do nothing now, with `options` (ctx.options) in force?
    Only the exact classes of _IDLE (a subclass may do more)."""
    idle = _IDLE.get((type(addon), name))
    if idle is None:
        return False
    try:
        return bool(idle(addon, options if options is not None else _options()))
    except Exception:  # noqa: BLE001 - an unexpected state: called, as mitmproxy would
        return False


def _gaps(indices: list[int], siblings: tuple[Any, ...]) -> list[tuple[tuple[int, Any], ...]]:
    """For each index in `indices` (ascending) and the end of `siblings`, the (index,
    addon) pairs since the previous one: addons the walk passes without a hook or
    children, whose places are checked so that none was replaced, added or taken away."""
    out, prev = [], -1
    for i in [*indices, len(siblings)]:
        out.append(tuple((j, siblings[j]) for j in range(prev + 1, i)))
        prev = i
    return out


class _Plan:
    """One event's hook table for one chain: `entries` holds (index in the chain, top-level
    addon, steps, gap) for each top-level addon whose subtree has the hook or has children
    (steps None: its subtree is walked the generic way, e.g. `addons` is not a list);
    `tail` the addons after the last entry."""

    __slots__ = ("chain", "entries", "generation", "options", "snapshot", "tail")

    def __init__(self, generation: int, chain: list[Any], name: str) -> None:
        self.generation = generation
        self.options = _options()  # what _IDLE's verdicts were given with
        self.chain = tuple(chain)
        # what `chain` is compared with on every event: `==` on lists compares identity
        # first, at C speed; equal distinct objects can only come from an __eq__ of
        # their own, and then identity is compared one by one
        self.snapshot = list(chain) if _plain_eq(chain) else None
        found: list[tuple[int, Any, Any]] = []
        for index, top in enumerate(self.chain):
            if _idle(top, name, self.options):
                continue  # not called; its place is checked with the gap it is in
            try:
                steps = _steps(top, name)
            except Exception:  # noqa: BLE001 - walked (and its error logged) as mitmproxy does
                found.append((index, top, None))
                continue
            if steps:
                if len(steps) == 1 and steps[0][0] == _CALL:
                    steps = _LEAF
                found.append((index, top, steps))
        gaps = _gaps([index for index, _, _ in found], self.chain)
        self.entries = tuple((index, top, steps, gap)
                             for (index, top, steps), gap in zip(found, gaps, strict=False))
        self.tail = gaps[-1]

    def fits(self, generation: int, chain: list[Any]) -> bool:
        if generation != self.generation or type(chain) is not list \
                or _options() is not self.options:
            return False
        if self.snapshot is not None:
            return chain == self.snapshot
        return len(chain) == len(self.chain) and all(map(_is, chain, self.chain))


def _plain_eq(objs: Any) -> bool:
    """No object here has an `__eq__` of its own (so `==` on them is identity)."""
    return all(type(o).__eq__ is _object_eq for o in objs)


def _same(now: Any, then: Any) -> bool:
    """Are `now` (children read in this event) the very addons `then` (read when the
    table was built)? `then` is a list when `==` on them is identity (see _Plan)."""
    if type(then) is list:
        return type(now) is list and now == then
    return type(now) in (list, tuple) and len(now) == len(then) and all(map(_is, now, then))


class _Untabled(Exception):
    """A subtree the table does not describe (children not a list or tuple): walked the
    generic way on every event."""


# A step: (kind, addon, depth, index in its parent's children, children read, gap) — depth
# 0 is the top-level addon itself; _END (kind, None, depth, number of children, None, gap)
# is where mitmproxy's walk finishes a parent's children (its list iterator exhausted);
# gap: the (index, addon) passed since the previous step at that depth (see _gaps).
_Step = tuple[int, Any, int, int, Any, tuple[tuple[int, Any], ...]]


def _steps(top: Any, name: str) -> tuple[_Step, ...]:
    """The walk of one top-level addon's subtree, as `_walk` would do it now."""
    raw: list[tuple[int, Any, int, int, Any]] = []
    stack: list[list[Any]] = [[(top,), 0]]  # per level: [siblings, next index]
    while stack:
        level = stack[-1]
        siblings, i = level
        if i >= len(siblings):
            stack.pop()
            if stack:
                raw.append((_END, siblings, len(stack), len(siblings), None))
            continue
        level[1] = i + 1
        a = siblings[i]
        depth = len(stack) - 1
        func = getattr(a, name, None)
        if func and not isinstance(func, types.ModuleType):
            raw.append((_CALL, a, depth, i, None))  # looked up again when called
        if hasattr(a, "addons"):
            children = a.addons
            if type(children) not in (list, tuple):
                raise _Untabled
            children = list(children) if type(children) is list and _plain_eq(children) \
                else tuple(children)
            raw.append((_CHECK, a, depth, i, children))
            stack.append([children, 0])
    if all(kind == _END for kind, *_ in raw):
        return ()
    # the gaps: per depth, the siblings passed since that depth's previous step
    steps: list[_Step] = []
    prev: list[int] = [-1]
    levels: list[tuple[Any, ...]] = [(top,)]
    for kind, a, depth, i, extra in raw:
        siblings = levels[depth]
        gap = tuple((j, siblings[j]) for j in range(prev[depth] + 1, i))
        if kind == _END:
            steps.append((_END, None, depth, i, None, gap))
            levels.pop()
            prev.pop()
            continue
        prev[depth] = i
        if kind == _CHECK and steps and steps[-1][0] == _CALL and steps[-1][1] is a:
            kind = _HELD  # right after its own hook: mitmproxy's walk still holds it
        steps.append((kind, a, depth, i, extra, gap))
        if kind != _CALL:
            levels.append(extra)
            prev.append(-1)
    return tuple(steps)


def _table(self: addonmanager.AddonManager, name: str, chain: list[Any]) -> _Plan:
    d = self.__dict__
    generation = d.get(_GEN, 0)
    plans = d.get(_TABLE)
    if plans is None:
        plans = d[_TABLE] = {}
    plan = plans.get(name)
    if plan is None or not plan.fits(generation, chain):
        plan = plans[name] = _Plan(generation, chain, name)
    return plan


def _invalidate(self: addonmanager.AddonManager) -> None:
    self.__dict__[_GEN] = self.__dict__.get(_GEN, 0) + 1


def _at(seq: Any, index: int) -> Iterator[Any]:
    """An iterator over `seq` positioned at `index`, as mitmproxy's own iterator would be
    there (list and tuple iterators are index-based)."""
    it = iter(seq)
    if index:
        it.__setstate__(index)  # type: ignore[attr-defined]
    return it


def _moved(live: Any, gap: tuple[tuple[int, Any], ...]) -> bool:
    """Is any addon of `gap` no longer at its index in `live`?"""
    n = len(live)
    for j, a in gap:
        if j >= n or live[j] is not a:
            return True
    return False


async def _call_all(walk: Iterator[tuple[Any, Any]], args: list[Any]) -> None:
    for _a, func in walk:
        res = func(*args)
        if res is not None and _isawaitable(res):
            await res


async def _run_steps(self: addonmanager.AddonManager, top: Any, steps: tuple[_Step, ...],
                     name: str, args: list[Any]) -> None:
    """One top-level addon's subtree from its table; exceptions go to the caller.

    `lists[d]` is the children list being walked at depth d (as read in this event) and
    `done[d]` the index in it of the last addon handled. Every place mitmproxy's walk
    passes is checked to hold the addon the table expects when the walk passes it (no
    hook runs in between); where it does not (an addon added, removed or replaced during
    this event), the walk goes on mitmproxy's way from exactly where mitmproxy's iterators
    would be: after the addon last handled at each level. A list that was compared whole
    and found unchanged is not looked at again until some code of an addon (a hook, a
    children property) has run: `ran` counts those, `verified[d]` is `ran` when lists[d]
    was compared."""
    lists: list[Any] = [(top,)]  # ours: nobody else can change it
    snaps: list[Any] = [None]    # the children the table was built from, per depth
    done = [-1]
    ran = 0
    verified = [-1]
    for kind, a, depth, i, extra, gap in steps:
        live = lists[depth]
        checked = not depth or verified[depth] == ran
        if not checked and type(snaps[depth]) is list and type(live) is list \
                and live == snaps[depth]:
            verified[depth] = ran  # the whole list unchanged (compared at C speed)
            checked = True
        if not checked and gap and _moved(live, gap):
            return await _resume(self, lists, done, depth, done[depth] + 1, name, args)
        if kind == _CALL:
            if not checked and (i >= len(live) or live[i] is not a):
                return await _resume(self, lists, done, depth, done[depth] + 1, name, args)
            done[depth] = i
            ran += 1
            func = getattr(a, name, None)
            if func:
                if callable(func):
                    res = func(*args)
                    if res is not None and _isawaitable(res):
                        await res
                elif not isinstance(func, types.ModuleType):
                    raise exceptions.AddonManagerError(
                        f"Addon handler {name} ({a}) not callable")
            continue
        if kind == _END:
            if not checked and len(live) != i:  # grew or shrank during the event
                return await _resume(self, lists, done, depth, done[depth] + 1, name, args)
            lists.pop()
            snaps.pop()
            done.pop()
            verified.pop()
            continue
        if kind == _CHECK and not checked and (i >= len(live) or live[i] is not a):
            return await _resume(self, lists, done, depth, done[depth] + 1, name, args)
        done[depth] = i
        ran += 1
        now = a.addons  # read where mitmproxy reads it: after the addon's own hook
        lists.append(now)
        snaps.append(extra)
        done.append(-1)
        verified.append(ran)
        if not _same(now, extra):
            return await _resume(self, lists, done, depth + 1, 0, name, args)
    return None


async def _resume(self: addonmanager.AddonManager, lists: list[Any], done: list[int],
                  depth: int, start: int, name: str, args: list[Any]) -> None:
    _invalidate(self)  # the table no longer describes this subtree: rebuilt next event
    stack = [_at(lists[d], done[d] + 1) for d in range(depth)]
    stack.append(iter(lists[depth]) if start == 0 else _at(lists[depth], start))
    await _call_all(_walk(stack, name), args)


def _addon_error() -> None:
    # as safecall(): log and go on with the next top-level addon
    etype, value, tb = sys.exc_info()
    tb = addonmanager.cut_traceback(tb, "trigger_event")
    _manager_log.error(f"Addon error: {value}", exc_info=(etype, value, tb))


async def _dispatch(self: addonmanager.AddonManager, name: str, args: list[Any],
                    plan: _Plan, chain: list[Any]) -> None:
    done = -1  # index in `chain` of the last top-level addon handled
    generic = False
    snapshot = plan.snapshot  # a list when `==` on the chain compares identity
    for index, top, steps, gap in plan.entries:
        if done >= 0 and (snapshot is None or chain != snapshot) and (
                (gap and _moved(chain, gap)) or index >= len(chain)
                or chain[index] is not top):
            generic = True  # the chain changed during this event: as mitmproxy from here
            break
        try:  # safecall()'s handling, per top-level addon
            if steps is _LEAF:  # most of mitmproxy's addons: one hook, no children
                func = getattr(top, name, None)
                if func:
                    if callable(func):
                        res = func(*args)
                        if res is not None and _isawaitable(res):
                            await res
                    elif not isinstance(func, types.ModuleType):
                        raise exceptions.AddonManagerError(
                            f"Addon handler {name} ({top}) not callable")
            elif steps is None:
                await _call_all(_walk([iter((top,))], name), args)
            else:
                await _run_steps(self, top, steps, name, args)
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception:  # noqa: BLE001 - as safecall()
            _addon_error()
        done = index
    if not generic and ((snapshot is not None and chain == snapshot) or (
            len(chain) == len(plan.chain) and not _moved(chain, plan.tail))):
        return
    # mitmproxy iterates the live list: go on after the last one handled, the generic way
    _invalidate(self)
    i = done + 1
    while i < len(chain):
        top = chain[i]
        i += 1
        try:
            await _call_all(_walk([iter((top,))], name), args)
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception:  # noqa: BLE001 - as safecall()
            _addon_error()


def _args(event: hooks.Hook) -> list[Any]:
    """`event.args()` without `dataclasses.fields` on every call: a hook class's fields
    are fixed when the class is made."""
    names = _FIELDS.get(type(event))
    if names is None:
        names = _FIELDS[type(event)] = tuple(f.name for f in dataclasses.fields(event))
    return [getattr(event, n) for n in names]


_FIELDS: dict[type, tuple[str, ...]] = {}  # one entry per hook class (mitmproxy has ~50)


async def trigger_event(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    chain = self.chain
    plan = _table(self, event.name, chain)
    if not plan.entries:
        return
    await _dispatch(self, event.name, _args(event), plan, chain)


async def handle_lifecycle(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    args = _args(event)  # built once: nothing runs between mitmproxy's two builds
    message = args[0]
    chain = self.chain
    plan = _table(self, event.name, chain)
    if plan.entries:
        await _dispatch(self, event.name, args, plan, chain)
    if isinstance(message, flow.Flow):
        chain = self.chain
        plan = _table(self, "update", chain)
        if plan.entries:
            await _dispatch(self, "update", [[message]], plan, chain)


_iter_hooks.agentgate_dispatch = True  # type: ignore[attr-defined]
trigger_event.agentgate_dispatch = True  # type: ignore[attr-defined]
handle_lifecycle.agentgate_dispatch = True  # type: ignore[attr-defined]
REPLACEMENTS = {"_iter_hooks": _iter_hooks, "trigger_event": trigger_event,
                "handle_lifecycle": handle_lifecycle}


def check_pins() -> list[str]:
    """What no longer matches the mitmproxy internals the replacements stand in for."""
    bad = []
    if not mitmproxy_version.VERSION.startswith(PINNED_MITMPROXY):
        bad.append(f"mitmproxy {mitmproxy_version.VERSION} is not {PINNED_MITMPROXY}x")
    for fn, fragment in _PINS:
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            src = ""
        if fragment not in src:
            bad.append(f"{fn.__qualname__} no longer contains {fragment!r}")
    return bad


def install() -> bool:
    """Put the replacements on AddonManager (once per process); False if mitmproxy's
    internals are not the ones they were written for (its own dispatch stays)."""
    cls = addonmanager.AddonManager
    if all(getattr(getattr(cls, k), "agentgate_dispatch", False) for k in REPLACEMENTS):
        return True
    bad = check_pins()
    if bad:
        log.warning("agentgate: mitmproxy's own addon dispatch is kept (%s)", "; ".join(bad))
        return False
    for k, fn in REPLACEMENTS.items():
        setattr(cls, k, fn)
    return True

"""A cheaper, exact event dispatch for mitmproxy 12.2's AddonManager.

Every flow event (requestheaders, request, responseheaders, response, and the `update` that
follows each) walks the whole addon chain: ~30 of mitmproxy's own addons plus the script's
~20. Per top-level addon, mitmproxy 12.2 enters a `contextlib` context manager (`safecall`)
and a coroutine (`invoke_addon`), walks the addon's children through one recursive
generator per nesting level (`traverse`; the script's addons sit four levels down) and
rebuilds the event's arguments with `dataclasses.fields` for every hook it calls. Measured
in-process on this machine: ~480 µs CPU per flow for the dispatch alone with the gateway's
chain, ~155 µs with the versions below (tests/frame/test_dispatch.py; bench numbers in
BENCHMARKS.md).

The replacements do exactly what the originals do, in the same order:
- `_iter_hooks`: the same pre-order walk as `traverse` with one generator and an explicit
  stack; an addon's `addons` is read after its own hook ran, as `traverse` reads it, so an
  addon that changes its children during an event is seen the same way; a module attribute
  named like the hook is skipped, any other non-callable raises AddonManagerError.
- `trigger_event`: per top-level addon, every hook of its subtree is called with the event's
  arguments and awaited when it returns an awaitable; `AddonHalt` stops the event,
  `OptionsError` propagates, any other exception is logged as "Addon error: ..." on
  mitmproxy's addonmanager logger (as `safecall` does) and the next addon runs.
Fail closed is not at stake here: our hooks are `guarded` (an exception refuses the flow),
and an exception that reaches the manager is handled as before. The install is
version-pinned and checks the source of what it replaces; anything unexpected leaves
mitmproxy's own dispatch in place (slower, same behaviour).
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks
from mitmproxy import version as mitmproxy_version

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
)
ORIGINAL = {"_iter_hooks": addonmanager.AddonManager._iter_hooks,
            "trigger_event": addonmanager.AddonManager.trigger_event}


def _iter_hooks(self: addonmanager.AddonManager, addon: Any, event: hooks.Hook
                ) -> Iterator[tuple[Any, Any]]:
    assert isinstance(event, hooks.Hook)
    name = event.name
    stack = [iter((addon,))]
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


async def trigger_event(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    args = event.args()
    isawaitable = inspect.isawaitable
    for i in self.chain:
        try:
            for _a, func in self._iter_hooks(i, event):
                res = func(*args)
                if res is not None and isawaitable(res):
                    await res
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception:  # noqa: BLE001 - as safecall(): log and go on with the next addon
            etype, value, tb = sys.exc_info()
            tb = addonmanager.cut_traceback(tb, "trigger_event")
            _manager_log.error(f"Addon error: {value}", exc_info=(etype, value, tb))


_iter_hooks.agentgate_dispatch = True  # type: ignore[attr-defined]
trigger_event.agentgate_dispatch = True  # type: ignore[attr-defined]


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
    if getattr(cls.trigger_event, "agentgate_dispatch", False):
        return True
    bad = check_pins()
    if bad:
        log.warning("agentgate: mitmproxy's own addon dispatch is kept (%s)", "; ".join(bad))
        return False
    cls._iter_hooks = _iter_hooks  # type: ignore[method-assign]
    cls.trigger_event = trigger_event  # type: ignore[method-assign]
    return True

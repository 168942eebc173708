"""mitmdump script for tests: make one agentgate addon raise on every hook.

`AGENTGATE_TEST_FAULT=<addon class name, lower case>`; the addon's instance state is replaced
by objects that raise on any use, so its real (guarded) hook code fails.
"""

from __future__ import annotations

import logging
import os

from mitmproxy import ctx


class _Raiser:
    def __getattr__(self, name: str):
        raise RuntimeError(f"injected fault ({name})")

    def __call__(self, *a, **k):
        raise RuntimeError("injected fault (call)")


class FaultInjector:
    def running(self) -> None:
        target = os.environ.get("AGENTGATE_TEST_FAULT", "")
        addon = ctx.master.addons.get(target)
        if addon is None:
            logging.error("fault_inject: no addon named %r", target)
            return
        for key in list(vars(addon)):
            setattr(addon, key, _Raiser())
        logging.warning("fault_inject: poisoned %s", target)


addons = [FaultInjector()]

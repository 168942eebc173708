"""Load the rules directory into the shared holder, and reload it when files change.

The gateway refuses to run on bad rules: at start-up an invalid directory stops mitmproxy;
later an invalid edit is reported and the previous rules stay in force. Until rules are
loaded every flow is refused (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules, rule_files
from addons.config.schema import ConfigError
from addons.frame import sentinel
from addons.frame.guard import guarded, refuse

log = logging.getLogger("agentgate.rules")


def snapshot(directory: str) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime_ns, size) of every rules file: cheap change detection."""
    out = []
    try:
        for p in rule_files(directory):
            st = p.stat()
            out.append((p.name, st.st_mtime_ns, st.st_size))
    except OSError:
        return ()
    return tuple(out)


class RulesLoader:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder
        self._snapshot: tuple = ()
        self._watch: asyncio.Task | None = None
        self._sentinel: sentinel.PipelineSentinel | None = None

    def load(self, loader) -> None:
        master = getattr(ctx, "master", None)
        if master is not None and hasattr(master, "addons"):
            self._sentinel = sentinel.attach(master)
            self._sentinel.loaded += 1
        loader.add_option("agentgate_rules", str, os.environ.get("AGENTGATE_RULES", "rules"),
                          "Directory of agentgate rules (*.yaml).")
        loader.add_option("agentgate_data", str, os.environ.get("AGENTGATE_DATA", "data"),
                          "Directory for agentgate's state (DuckDB audit store).")
        loader.add_option("agentgate_rules_poll_ms", int, 1000,
                          "Milliseconds between checks for changed rules files (0: never reload).")

    def configure(self, updated: set[str]) -> None:
        if "agentgate_rules" not in updated:
            return
        directory = ctx.options.agentgate_rules
        try:
            rules = load_rules(directory)
        except ConfigError as e:
            self.holder.last_error = str(e)
            # At start-up mitmdump exits on an error logged while starting ("Error logged
            # during startup, exiting..."); later the previous rules stay in force.
            raise exceptions.OptionsError(f"invalid rules: {e}") from None
        self._snapshot = snapshot(directory)
        self.holder.install(rules)
        log.info("agentgate: rules loaded from %s (%d files, %d upstreams)",
                 Path(directory).resolve(), len(rules.files), len(rules.upstreams))

    def running(self) -> None:
        if ctx.options.agentgate_rules_poll_ms > 0 and self._watch is None:
            self._watch = asyncio.create_task(self._watcher())

    def done(self) -> None:
        if self._watch:
            self._watch.cancel()
        if self._sentinel is not None:
            self._sentinel.loaded -= 1
            self._sentinel = None

    async def _watcher(self) -> None:
        while True:
            await asyncio.sleep(ctx.options.agentgate_rules_poll_ms / 1000)
            directory = ctx.options.agentgate_rules
            snap = snapshot(directory)
            if snap == self._snapshot:
                continue
            self._snapshot = snap
            try:
                rules = await asyncio.to_thread(load_rules, directory)
            except ConfigError as e:
                self.holder.last_error = str(e)
                log.error("agentgate: rules change rejected, previous rules stay in force: %s", e)
                continue
            except Exception as e:  # noqa: BLE001 - keep the old rules on any failure
                self.holder.last_error = f"{type(e).__name__}: {e}"
                log.error("agentgate: rules reload failed (%s); previous rules stay in force",
                          type(e).__name__)
                continue
            self.holder.install(rules)
            log.info("agentgate: rules reloaded (version %d)", self.holder.version)

    @guarded("rules")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.holder.rules is None:
            refuse(flow, 503, "gateway has no valid rules loaded", "no_rules", "rules")

    @guarded("rules")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.holder.rules is None:
            refuse(flow, 503, "gateway has no valid rules loaded", "no_rules", "rules")


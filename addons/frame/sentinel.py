"""Keep the gateway closed when its addon script is not loaded.

mitmproxy reloads `addons/gateway.py` whenever the file changes and, if the new version fails
to load, simply runs without it — an open proxy. The same happens when the script is removed
from the `scripts` option (e.g. from mitmweb). The sentinel is registered directly on the
master's addon chain (not under the script), at the front, and refuses every flow while the
agentgate pipeline is not loaded.
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.addonmanager import traverse

from addons.frame.guard import guarded, refuse

log = logging.getLogger("agentgate")


class PipelineSentinel:
    name = "agentgate_sentinel"

    def __init__(self, master=None) -> None:
        self._loaded = 0  # number of live pipelines (a reload briefly has old + new)
        self.master = master
        # Walking the whole chain (~70 addons with the script's) on every hook of every
        # flow is measurable; a positive answer is kept until something could change it:
        # any load()/done() of a pipeline (`loaded` changing, even back to the same count:
        # a reload whose new script fails after load()), or the top-level chain list being
        # replaced or resized (AddonManager.add/remove).
        self._generation = 0
        self._verified: tuple[int, int, int] | None = None

    @property
    def loaded(self) -> int:
        return self._loaded

    @loaded.setter
    def loaded(self, value: int) -> None:
        self._loaded = value
        self._generation += 1
        self._verified = None

    def _in_chain(self) -> bool:
        """`_pipeline_in_chain`, remembered while neither the pipelines nor the chain
        changed (only a positive answer is kept: a missing pipeline is looked for again on
        every flow)."""
        if self.master is None:
            return True
        chain = self.master.addons.chain
        key = (self._generation, id(chain), len(chain))
        if self._verified == key:
            return True
        if not self._pipeline_in_chain():
            return False
        self._verified = key
        return True

    def _pipeline_in_chain(self) -> bool:
        """Is an addon marked `agentgate_pipeline` really in the chain?

        `loaded` counts load() calls; mitmproxy can fail a script after some addons were
        loaded (an OptionsError while applying deferred options) and then never put the
        script in the chain: counted, yet not running."""
        if self.master is None:
            return True
        return any(getattr(a, "agentgate_pipeline", False)
                   for a in traverse(self.master.addons.chain))

    def _check(self, flow: http.HTTPFlow) -> None:
        if self._loaded <= 0 or not self._in_chain():
            refuse(flow, 503, "the agentgate addon pipeline is not loaded (script failed to "
                   "load or was removed); all traffic is refused", "pipeline_not_loaded",
                   "sentinel")

    @guarded("sentinel")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._check(flow)

    @guarded("sentinel")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._check(flow)

    @guarded("sentinel")
    def request(self, flow: http.HTTPFlow) -> None:
        self._check(flow)


def attach(master) -> PipelineSentinel:
    """The master's sentinel, registered at the front of the chain on first use."""
    addons = master.addons
    sentinel = addons.get(PipelineSentinel.name)
    if sentinel is None:
        sentinel = PipelineSentinel(master)
        addons.register(sentinel)
        addons.chain.insert(0, sentinel)
    return sentinel

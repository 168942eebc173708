"""Loaded by tests with `-s` after addons/gateway.py: the gateway's real heavy-work pool
(frame/offload.FairPool) with one slot and a queue of one job per identity, so that a
test can fill one identity's share with a few requests instead of a flood. It logs when
the slot is taken (a test waits for that line before it counts on the slot being held)."""

import logging

from addons.frame import offload

log = logging.getLogger("agentgate.offload")


class _Pool(offload.FairPool):
    def _start(self, key: str) -> None:
        super()._start(key)
        log.warning("tiny pool: slot taken (%d running)", self.running)


offload.POOL = _Pool(total=1, per_key=1, queue_per_key=1, queue_total=64)

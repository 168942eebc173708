"""Loaded by tests with `-s` after addons/gateway.py: the gateway's real heavy-work pool
(frame/offload.FairPool) with one slot and a queue of one job per identity, so that a
test can fill one identity's share with a few requests instead of a flood."""

from addons.frame import offload

offload.POOL = offload.FairPool(total=1, per_key=1, queue_per_key=1, queue_total=64)

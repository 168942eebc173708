"""The gateway's own listening sockets, as bound. Pure; no mitmproxy import.

The egress check refuses every upstream connection that would reach one of the gateway's own
listeners (addons/egress/addresses.is_own_listener). Knowing them from configuration is not
enough: a listener given port 0 binds an ephemeral port the options never show, and a
listener added later (a database, the probes) would be missed until someone remembered to
list its option. So every listener the suite opens registers the addresses it actually bound
here, and unregisters them when it closes; the egress check reads them at each connection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable

_lock = threading.Lock()
_bound: dict[int, frozenset[tuple[str, int]]] = {}


def addresses(sockets: Iterable[socket.socket]) -> frozenset[tuple[str, int]]:
    """The (host, port) each of `sockets` is bound to."""
    out = set()
    for s in sockets:
        try:
            name = s.getsockname()
        except OSError:
            continue
        if isinstance(name, tuple) and len(name) >= 2:
            out.add((str(name[0]), int(name[1])))
    return frozenset(out)


def register(owner: object, sockets: Iterable[socket.socket]) -> None:
    """`owner`'s listening sockets (replacing what it registered before)."""
    addrs = addresses(sockets)
    with _lock:
        _bound[id(owner)] = addrs


def unregister(owner: object) -> None:
    with _lock:
        _bound.pop(id(owner), None)


def bound() -> set[tuple[str, int]]:
    """Every (host, port) a registered listener is bound to."""
    with _lock:
        return {a for addrs in _bound.values() for a in addrs}

"""addons/frame/listeners.py: the bound addresses of the suite's own listeners."""

from __future__ import annotations

import socket

from addons.egress.addresses import refusal
from addons.frame import listeners


def test_an_ephemeral_port_is_known_as_bound_and_refused_as_an_upstream() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # port 0: only the socket knows the port
    s.listen()
    owner = object()
    try:
        port = s.getsockname()[1]
        listeners.register(owner, [s])
        assert ("127.0.0.1", port) in listeners.bound()
        why = refusal("127.0.0.1", port, explicit={("127.0.0.1", port)}, allow_private=True,
                      listeners=listeners.bound())
        assert why is not None and "own listeners" in why
        listeners.unregister(owner)
        assert ("127.0.0.1", port) not in listeners.bound()
    finally:
        listeners.unregister(owner)
        s.close()


def test_a_closed_socket_is_skipped() -> None:
    s = socket.socket()
    s.close()
    owner = object()
    listeners.register(owner, [s])
    try:
        assert all(p != 0 for _, p in listeners.bound())
    finally:
        listeners.unregister(owner)

"""Connect only to addresses that were checked, and pin the connection to them.

mitmproxy resolves the upstream name itself when it opens the connection; a check made
earlier on another lookup can be swapped by DNS rebinding. `server_connect` is the last hook
before the socket is opened: it resolves the name (without blocking the loop), refuses any
address the rules do not allow (addresses.refusal) and sets the connection's address to the
vetted IP. The TLS SNI was already set to the declared name, and the request's Host header is
untouched, so the upstream still sees the name.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from mitmproxy import ctx
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from addons.config.holder import RulesHolder
from addons.egress.addresses import refusal
from addons.egress.config import is_ip
from addons.frame import listeners
from addons.frame.guard import guarded

log = logging.getLogger("agentgate.destination")

RESOLVE_TIMEOUT = 10.0


def _listen(text: str | None) -> tuple[str, int] | None:
    if not text or text == "off" or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def served_by_tornado() -> list[socket.socket]:
    """The listening sockets tornado's IOLoop serves in this process: mitmweb's UI (its
    HTTPServer is a local of WebMaster.running, so its socket is found here) and the
    reviewers' API."""
    try:
        from tornado.ioloop import IOLoop
    except ImportError:  # pragma: no cover - tornado comes with mitmproxy
        return []
    loop = IOLoop.current(instance=False)
    out = []
    for entry in list((getattr(loop, "handlers", None) or {}).values()):
        sock = entry[0] if isinstance(entry, tuple) and entry else None
        if isinstance(sock, socket.socket):
            try:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    out.append(sock)
            except OSError:
                continue
    return out


class Destinations:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder

    def running(self) -> None:
        # mitmweb binds its UI before `running`; with web_port 0 on a port no option shows
        # (and mitmproxy's own log says :0): registered as bound, so that no rules can make
        # it an upstream, and named in the log
        if not hasattr(ctx.master, "app"):  # mitmdump: no UI
            return
        socks = served_by_tornado()
        listeners.register(self, socks)
        for host, port in sorted(listeners.addresses(socks)):
            log.info("agentgate: own listener (mitmweb UI and reviewers' API) on %s:%d",
                     host, port)

    def done(self) -> None:
        listeners.unregister(self)

    def _listeners(self) -> set[tuple[str, int]]:
        out: set[tuple[str, int]] = set()
        opts = ctx.options
        out.add((opts.listen_host or "", opts.listen_port or 8080))
        for spec in getattr(opts, "mode", []) or []:
            if "@" in spec:
                addr = _listen(spec.rsplit("@", 1)[1]) or ("", _int(spec.rsplit("@", 1)[1]))
                if addr[1]:
                    out.add(addr)
        for name in ("agentgate_approvals_listen", "web_port"):
            value: Any = getattr(opts, name, None)
            if isinstance(value, int) and value:
                out.add((getattr(opts, "web_host", "") or "", value))
            elif isinstance(value, str) and (addr := _listen(value)):
                out.add(addr)
        rules = self.holder.rules
        approvals = getattr(rules, "approvals", None) if rules else None
        listen = getattr(approvals, "listen", None)
        if isinstance(listen, tuple) and len(listen) == 2:
            out.add((str(listen[0]), int(listen[1])))
        # what is actually bound: mitmproxy's proxy servers and every listener of the suite
        # (a port 0 in the options binds a port only the socket knows)
        proxyserver = ctx.master.addons.get("proxyserver") if ctx.master else None
        if proxyserver is not None:
            for addr in proxyserver.listen_addrs():
                if isinstance(addr, tuple) and len(addr) >= 2:
                    out.add((str(addr[0]), int(addr[1])))
        out |= listeners.bound()
        return out

    def _explicit_and_private(self, name: str, port: int) -> tuple[set, bool]:
        rules = self.holder.rules
        explicit: set[tuple[str, int | None]] = set()
        allow_private = False
        for up in rules.upstreams if rules else ():
            explicit |= up.literal_addresses()
            if up.allow_private and (
                    up.matches(name, port)
                    or (up.forward_to is not None and up.forward_to[1] == name
                        and up.forward_to[2] == port)):
                allow_private = True
        return explicit, allow_private

    @guarded("destination")
    async def server_connect(self, data: ServerConnectionHookData) -> None:
        try:
            await self._pin(data)
        except Exception as exc:  # noqa: BLE001 - fail closed: no check, no connection
            log.error("agentgate: destination check failed (%s)", type(exc).__name__)
            data.server.error = "agentgate: destination check failed; connection refused"

    async def _pin(self, data: ServerConnectionHookData) -> None:
        server = data.server
        if server.address is None or server.via is not None:
            data.server.error = "agentgate: no destination address"
            return
        host, port = str(server.address[0]), int(server.address[1])
        name = host.lower().rstrip(".")
        if is_ip(name):
            addrs = [name.strip("[]")]
        else:
            loop = asyncio.get_running_loop()
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
            addrs = list(dict.fromkeys(str(i[4][0]) for i in infos))
        if not addrs:
            server.error = f"agentgate: {name} did not resolve"
            return
        explicit, allow_private = self._explicit_and_private(name, port)
        if not is_ip(name):
            explicit = set()  # an address the rules name literally; never a name's answer
        listeners = self._listeners()
        for addr in addrs:
            why = refusal(addr, port, explicit=explicit, allow_private=allow_private,
                          listeners=listeners)
            if why is not None:
                # Any refused answer refuses the name: a rebinding answer set is not
                # cherry-picked.
                log.warning("agentgate: refusing upstream connection to %s:%s: %s",
                            name, port, why)
                server.error = f"agentgate: destination refused: {why}"
                return
        server.address = (addrs[0], port)  # pinned: connect to what was checked


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0

"""Which resolved addresses an upstream connection may reach. Pure; no mitmproxy import.

A declared *name* must resolve to a public address: loopback, private, link-local (cloud
metadata 169.254.169.254), CGNAT, multicast, unspecified, reserved, documentation ranges and
IPv6 forms that embed such an IPv4 address (mapped, 6to4, Teredo, NAT64) are refused unless
the upstream declares `allow_private: true`, or the rules name that exact address (an IP in
`hosts` or `forward_to`). The gateway's own listeners are refused whatever the rules say.
"""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_v4(ip: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, Teredo, NAT64)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: Address) -> bool:
    inner = embedded_v4(ip)
    if inner is not None and not is_public(inner):
        return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def is_own_listener(ip: Address, port: int, listeners: set[tuple[str, int]]) -> bool:
    """Does (ip, port) reach one of the gateway's own listening sockets?

    A listener on a wildcard address answers on every local address, so any non-public
    address with that port counts; a public address counts when it is the listener's."""
    inner = embedded_v4(ip) or ip
    for host, lport in listeners:
        if lport != port:
            continue
        if host in ("", "0.0.0.0", "::", "*") or not is_public(inner):
            return True
        try:
            if ipaddress.ip_address(host.strip("[]")) in (ip, inner):
                return True
        except ValueError:
            return True  # a named listener: be conservative
    return False


def refusal(ip_text: str, port: int, *, explicit: set[tuple[str, int | None]],
            allow_private: bool, listeners: set[tuple[str, int]]) -> str | None:
    """Why (ip, port) may not be an upstream, or None when it may."""
    ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
    if is_own_listener(ip, port, listeners):
        return f"{ip}:{port} is one of the gateway's own listeners"
    if is_public(ip):
        return None
    if allow_private or (str(ip), port) in explicit or (str(ip), None) in explicit:
        return None
    return (f"{ip} is a loopback/private/link-local/reserved address; declare the upstream "
            "with allow_private: true (or name the address in hosts/forward_to)")

"""Host-name facts every concern needs the same way. Pure; imports nothing of ours."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback IP literal (brackets and case ignored). A name is never
    resolved here: only what is written counts."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

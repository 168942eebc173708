"""The `mcp` rules section (a mapping). Pure; no mitmproxy import.

```yaml
mcp:
  unknown_methods: deny        # deny | allow: methods MCP clients do not normally send
  allow_sampling: false        # true, false, or a list of upstream names
  allow_elicitation: false     # same
  description_scan: observe    # observe | block | off
  max_event_bytes: 4MiB-ish    # one SSE event / JSON body the gateway parses
  pinning:
    enabled: true
    scope: server              # server | identity
    on_change: block           # block | approve
    approvers: [security]      # on_change: approve; who may approve such calls
    timeout: 300               # on_change: approve; seconds before the hold is denied
    store: data/mcp-pins.json  # default: <agentgate_data>/mcp-pins.json
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from addons.config.schema import (
    MapSection,
    Where,
    expect_bool,
    expect_int,
    expect_map,
    expect_number,
    expect_str,
    expect_str_list,
)

KEYS = {"unknown_methods", "allow_sampling", "allow_elicitation", "description_scan",
        "pinning", "max_event_bytes"}
PINNING_KEYS = {"enabled", "scope", "on_change", "approvers", "timeout", "store"}


@dataclass(frozen=True)
class PinningConfig:
    enabled: bool = True
    scope: str = "server"
    on_change: str = "block"
    approvers: tuple[str, ...] = ()
    timeout: float | None = None
    store: str | None = None


@dataclass(frozen=True)
class McpConfig:
    unknown_methods: str = "deny"
    # None: never; () : every upstream; names: those upstreams
    allow_sampling: tuple[str, ...] | None = None
    allow_elicitation: tuple[str, ...] | None = None
    description_scan: str = "observe"
    pinning: PinningConfig = PinningConfig()
    max_event_bytes: int = 4 << 20

    def allows(self, which: tuple[str, ...] | None, upstream: str | None) -> bool:
        if which is None:
            return False
        return not which or upstream in which

    def describe(self) -> str:
        p = self.pinning
        pin = f"pinning per {p.scope}, on change {p.on_change}" if p.enabled else "no pinning"
        return (f"unknown methods {self.unknown_methods}, {pin}, description scan "
                f"{self.description_scan}, sampling "
                f"{'off' if self.allow_sampling is None else 'allowed'}, elicitation "
                f"{'off' if self.allow_elicitation is None else 'allowed'}")


def _choice(value: Any, where: Where, choices: tuple[str, ...]) -> str:
    text = expect_str(value, where)
    if text not in choices:
        raise where.error(f"must be one of {', '.join(choices)}, got {text!r}")
    return text


def _allow(value: Any, where: Where, upstreams: dict[str, str]) -> tuple[str, ...] | None:
    if isinstance(value, bool):
        return () if value else None
    names = expect_str_list(value, where)
    if not names:
        raise where.error("give true, false or a non-empty list of upstream names")
    for i, n in enumerate(names):
        if upstreams.get(n) != "mcp":
            raise where.child(i).error(f"no upstream of dialect mcp named {n!r}")
    return names


def parse_mcp(section: MapSection, upstreams: dict[str, str] | None = None) -> McpConfig:
    """`upstreams`: name -> dialect of the declared upstreams (to check names)."""
    ups = upstreams or {}
    d = expect_map(section.data, section.where(), KEYS)
    w = section.where
    pinning = PinningConfig()
    if d.get("pinning") is not None:
        pw = w("pinning")
        p = expect_map(d["pinning"], pw, PINNING_KEYS)
        on_change = _choice(p.get("on_change", "block"), pw.child("on_change"),
                            ("block", "approve"))
        approvers = expect_str_list(p.get("approvers", []), pw.child("approvers"))
        if on_change == "approve" and not approvers:
            raise pw.child("approvers").error(
                "on_change: approve needs approver groups; otherwise nobody could approve")
        if on_change != "approve" and ("approvers" in p or "timeout" in p):
            key = "approvers" if "approvers" in p else "timeout"
            raise pw.child(key).error("only allowed with on_change: approve")
        timeout = None
        if p.get("timeout") is not None:
            timeout = expect_number(p["timeout"], pw.child("timeout"), minimum=0.01,
                                    maximum=7 * 24 * 3600)
        store = None
        if p.get("store") is not None:
            store = expect_str(p["store"], pw.child("store"))
        pinning = PinningConfig(
            enabled=expect_bool(p.get("enabled", True), pw.child("enabled")),
            scope=_choice(p.get("scope", "server"), pw.child("scope"),
                          ("server", "identity")),
            on_change=on_change, approvers=approvers, timeout=timeout, store=store)
    return McpConfig(
        unknown_methods=_choice(d.get("unknown_methods", "deny"), w("unknown_methods"),
                                ("deny", "allow")),
        allow_sampling=_allow(d.get("allow_sampling", False), w("allow_sampling"), ups),
        allow_elicitation=_allow(d.get("allow_elicitation", False), w("allow_elicitation"),
                                 ups),
        description_scan=_choice(d.get("description_scan", "observe"),
                                 w("description_scan"), ("observe", "block", "off")),
        pinning=pinning,
        max_event_bytes=expect_int(d.get("max_event_bytes", 4 << 20), w("max_event_bytes"),
                                   minimum=1024, maximum=256 << 20),
    )

"""`agentgate mcp pins list|accept|reset`: the operator's side of tool pinning.

  agentgate mcp pins list [--json]                  every pinned tool, changed ones marked
  agentgate mcp pins accept SERVER TOOL [--identity SUB [--issuer ISS]]
                                                    accept a changed (or flagged) definition
  agentgate mcp pins reset (SERVER [TOOL] | --all) [--identity SUB [--issuer ISS]]
                                                    forget pins; re-pinned on the next list

The store is the gateway's own file (addons/mcp/pins.py), found by `--store`, else
$AGENTGATE_MCP_PINS, else the rules' `mcp.pinning.store` ($AGENTGATE_RULES or ./rules),
else <$AGENTGATE_DATA or ./data>/mcp-pins.json. The running gateway sees a change on the
next call (it re-reads the file when it changes). With `pinning.scope: identity` a server
has one pin set per identity (issuer and subject): `--identity SUB` picks that subject's
(of every issuer, or of `--issuer ISS`); without it, all of that server's.
Exit status: 0 done, 1 nothing matched, 2 usage or store error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from addons.mcp.pins import PinStore, scope_identity


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mcp", help="MCP tool servers: pinned tool definitions",
                       description="Inspect and accept the tool definitions the gateway pinned.")
    msub = p.add_subparsers(dest="mcp_command", required=True)
    pins = msub.add_parser("pins", help="list, accept or reset pinned tools")
    psub = pins.add_subparsers(dest="pins_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=None, help="the pin store file (see above)")
    common.add_argument("--rules", default=None, help="rules directory (for mcp.pinning.store)")
    ls = psub.add_parser("list", parents=[common], help="every pinned tool")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    acc = psub.add_parser("accept", parents=[common],
                          help="accept a tool's changed or flagged definition")
    acc.add_argument("server")
    acc.add_argument("tool")
    acc.add_argument("--identity", default=None, help="one identity's pins (scope: identity)")
    acc.add_argument("--issuer", default=None,
                     help="with --identity: only that issuer's subject of this name")
    acc.set_defaults(func=cmd_accept)
    rs = psub.add_parser("reset", parents=[common], help="forget pins")
    rs.add_argument("server", nargs="?")
    rs.add_argument("tool", nargs="?")
    rs.add_argument("--identity", default=None)
    rs.add_argument("--issuer", default=None)
    rs.add_argument("--all", action="store_true", help="forget every pin of every server")
    rs.set_defaults(func=cmd_reset)


def store_path(args: argparse.Namespace) -> Path:
    if args.store:
        return Path(args.store)
    if os.environ.get("AGENTGATE_MCP_PINS"):
        return Path(os.environ["AGENTGATE_MCP_PINS"])
    rules_dir = args.rules or os.environ.get("AGENTGATE_RULES", "rules")
    if Path(rules_dir).is_dir():
        from addons.config.loader import load_rules
        from addons.config.schema import ConfigError
        try:
            path = load_rules(rules_dir).mcp.pinning.store
        except ConfigError as e:
            raise SystemExit(f"agentgate: {e}") from None
        if path:
            return Path(path)
    return Path(os.environ.get("AGENTGATE_DATA", "data")) / "mcp-pins.json"


def _scopes(store: PinStore, server: str, identity: str | None,
            issuer: str | None = None) -> list[str]:
    """The server's pin sets; with `identity`, that subject's (of `issuer` if given: the
    same subject from two trusted issuers is two identities with a pin set each)."""
    out = []
    for scope in store.list():
        name, iss, sub = scope_identity(scope)
        if name == server and (identity is None or sub == identity) and \
                (issuer is None or iss == issuer):
            out.append(scope)
    return out


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def cmd_list(args: argparse.Namespace) -> int:
    data = PinStore(store_path(args)).list()
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=True))
        return 0
    if not data:
        print("no pinned tools")
        return 0
    for scope in sorted(data):
        server, iss, sub = scope_identity(scope)
        print(f"{server}" + (f" (identity {sub}" + (f" of {iss})" if iss else ")")
                             if sub else ""))
        for tool, e in sorted(data[scope].items()):
            state = "CHANGED" if e.get("changed") else "pinned"
            sus = e.get("suspicious") or []
            flag = f"  flagged: {', '.join(sus)}" + (" (accepted)" if e.get("accepted") else "") \
                if sus else ""
            print(f"  {tool:32} {state:8} {e['sha256'][:16]}  since {_when(e.get('pinned_at'))}"
                  + (f"  new {e['changed'][:16]} at {_when(e.get('changed_at'))}"
                     if e.get("changed") else "") + flag)
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    store = PinStore(store_path(args))
    scopes = _scopes(store, args.server, args.identity, args.issuer)
    done = [s for s in scopes if store.accept(s, args.tool)]
    if not done:
        print(f"agentgate: no pinned tool {args.tool!r} of {args.server!r}", file=sys.stderr)
        return 1
    print(f"accepted {args.server}/{args.tool} ({len(done)} pin set(s))")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    store = PinStore(store_path(args))
    if args.all:
        n = store.reset()
    elif args.server:
        n = sum(store.reset(s, args.tool) for s in _scopes(store, args.server, args.identity,
                                                          args.issuer))
    else:
        print("agentgate: name a server (and a tool), or --all", file=sys.stderr)
        return 2
    print(f"forgot {n} pin(s)")
    return 0 if n else 1

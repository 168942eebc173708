"""`agentgate rules check [DIR]`: validate a rules directory as the gateway would."""

from __future__ import annotations

import argparse
import os
import sys

from addons.config.loader import load_rules
from addons.config.schema import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="work with rules directories")
    rsub = p.add_subparsers(dest="rules_command", required=True)
    c = rsub.add_parser("check", help="validate a rules directory")
    c.add_argument("directory", nargs="?", default=os.environ.get("AGENTGATE_RULES", "rules"))
    c.set_defaults(func=check)


def check(args: argparse.Namespace) -> int:
    try:
        rules = load_rules(args.directory)
    except ConfigError as e:
        print(f"invalid rules: {e}", file=sys.stderr)
        return 1
    print(f"rules OK: {args.directory} ({len(rules.files)} files)")
    for up in rules.upstreams:
        cred = up.credential.describe() if up.credential else "no credential"
        ready = "" if up.credential is None or up.credential.resolve() is not None \
            else "  [credential not set in this environment]"
        fwd = f" -> {up.forward_to[0]}://{up.forward_to[1]}:{up.forward_to[2]}" \
            if up.forward_to else ""
        print(f"  upstream {up.name}: {', '.join(up.hosts)} ({up.dialect}; {cred}){fwd}{ready}")
    for db in getattr(rules, "databases", ()) or ():
        print(f"  database {db.describe()}")
    for line in _section_summaries(rules):
        print(f"  {line}")
    return 0


def _section_summaries(rules) -> list[str]:
    out = []
    for name in ("identity", "masking", "policies", "approvals", "recorder", "mcp"):
        value = getattr(rules, name)
        describe = getattr(value, "describe", None)
        if callable(describe):
            out.append(f"{name}: {describe()}")
        elif isinstance(value, tuple):
            out.append(f"{name}: {len(value)}")
    return out

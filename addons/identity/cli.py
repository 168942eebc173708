"""`agentgate token verify [--rules DIR] TOKEN|-`: verify a token exactly as the gateway would.

Prints the identity as JSON and exits 0, or prints why the token is refused and exits 1.
The same rules parser, JWKS fetcher and verifier as the gateway are used; only the process
is different (keys are fetched fresh). The token itself is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.identity.jwks import JwksStore, make_verifier
from addons.identity.jwt import TokenError, unverified_summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="work with identity tokens")
    tsub = p.add_subparsers(dest="token_command", required=True)
    v = tsub.add_parser("verify", help="verify an OIDC token as the gateway would",
                        description="Verify a token against the issuers in the rules. "
                        "Prints the identity as JSON (exit 0) or the reason (exit 1).")
    v.add_argument("token", help="the token, or '-' to read it from standard input")
    v.add_argument("--rules", default=os.environ.get("AGENTGATE_RULES", "rules"),
                   help="rules directory (default: $AGENTGATE_RULES or ./rules)")
    v.add_argument("--ca", default=os.environ.get("AGENTGATE_IDENTITY_CA") or None,
                   help="PEM CA bundle for https issuers (gateway option "
                   "agentgate_identity_ca)")
    v.set_defaults(func=verify)


def verify(args: argparse.Namespace) -> int:
    token = sys.stdin.read() if args.token == "-" else args.token
    token = token.strip()
    try:
        rules = load_rules(args.rules)
    except ConfigError as e:
        print(f"token not verified: invalid rules: {e}", file=sys.stderr)
        return 1
    verifier = make_verifier(rules.identity, JwksStore(ca_file=args.ca))
    try:
        identity = asyncio.run(verifier.verify(token))
    except TokenError as e:
        print(f"token refused: {e.reason} [{e.code}]", file=sys.stderr)
        facts = unverified_summary(token)
        if facts:
            # Unverified header/claims help users compare their IdP's tokens with the rules.
            print("unverified token facts: " + json.dumps(facts, sort_keys=True),
                  file=sys.stderr)
        return 1
    print(json.dumps(identity, indent=2, sort_keys=True))
    return 0

"""The `agentgate` command. Each concern registers its own sub-commands.

  agentgate rules check [DIR]          validate a rules directory
  agentgate token verify TOKEN|-       (identity)
  agentgate mask                       (masking)
  agentgate policy test / approvals    (policy and approval)
  agentgate audit / export             (recorder)
  agentgate demo                       a real LangGraph agent through the gateway
  agentgate dev / token dev            local trial: dev IdP + stand-in + gateway, tokens
  agentgate connect                    agent-side forwarder: loopback proxy, fresh token
  agentgate mcp pins list|accept|reset pinned MCP tool definitions
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> it defines register(subparsers); kept as names so a missing optional
# dependency of one command does not break the others.
COMMAND_MODULES = (
    "addons.config.cli",
    "addons.identity.cli",
    "addons.masking.cli",
    "addons.policy.cli",
    "addons.approval.cli",
    "addons.recording.cli",
    "addons.devkit.demo",
    "addons.devkit.dev",   # after identity: adds `token dev` to its `token` group
    "addons.connect.cli",
    "addons.mcp.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentgate",
                                     description="agentgate: zero-trust gateway for AI agents")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""`agentgate mask`: mask stdin to stdout exactly as the gateway would.

  agentgate mask [--rules DIR] [--json [--dialect D]] [--report]

Text mode masks the whole input as one text. `--json` treats the input as an HTTP JSON
request body (OpenAI chat/responses, Anthropic messages or any JSON; the dialect is
detected from the shape unless `--dialect` is given) and uses the gateway's JSON-aware
placement. `--report` prints the findings (entity -> count and strategy, never a value)
as JSON instead of the masked text. Exit status: 0 done, 2 bad rules or an input the
gateway would refuse (with the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DIALECTS = ("auto", "openai", "anthropic", "generic")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mask", help="mask stdin to stdout as the gateway would",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", metavar="DIR", default=None,
                   help="rules directory (default: $AGENTGATE_RULES or ./rules; built-in "
                        "defaults when neither exists)")
    p.add_argument("--json", action="store_true",
                   help="stdin is a JSON request body (JSON-aware placement)")
    p.add_argument("--dialect", choices=DIALECTS, default="auto",
                   help="shape of the --json body (default: detect)")
    p.add_argument("--report", action="store_true",
                   help="print the findings as JSON instead of the masked text")
    p.set_defaults(func=run)


def detect_dialect(obj: Any) -> str:
    """openai / anthropic / generic from the shape of a request body."""
    if not isinstance(obj, dict):
        return "generic"
    if "anthropic_version" in obj or "system" in obj or "stop_sequences" in obj:
        return "anthropic"
    for t in obj.get("tools") or ():
        if isinstance(t, dict) and "input_schema" in t:
            return "anthropic"
    for m in obj.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and (part.get("type") in ("tool_use", "tool_result")
                                           or "source" in part):
                return "anthropic"
    if "messages" in obj or "input" in obj or "instructions" in obj:
        return "openai"
    return "generic"


def load_masking_config(rules: str | None) -> Any:
    from addons.config.loader import load_rules
    from addons.masking.config import MaskingConfig
    directory = rules or os.environ.get("AGENTGATE_RULES") or "rules"
    if rules is None and not Path(directory).is_dir():
        return MaskingConfig()
    return load_rules(directory).masking


def run(args: argparse.Namespace) -> int:
    from addons.config.schema import ConfigError
    from addons.masking.bodies import Masked, Unparseable
    from addons.masking.detectors import DetectorSet
    from addons.masking.masker import Masker, Session

    try:
        cfg = load_masking_config(args.rules)
    except ConfigError as e:
        print(f"agentgate mask: invalid rules: {e}", file=sys.stderr)
        return 2
    key = cfg.hmac_key() if hasattr(cfg, "hmac_key") else None
    masker = Masker(DetectorSet(cfg), key)
    data = sys.stdin.buffer.read()
    found: dict = {}
    session = Session()
    if args.json:
        dialect = args.dialect
        if dialect == "auto":
            try:
                dialect = detect_dialect(json.loads(data))
            except ValueError:
                print("agentgate mask: input is not valid JSON", file=sys.stderr)
                return 2
        ctx = Masked(masker, session, found, dialect=dialect)
        try:
            new = ctx.body(data, "application/json",
                           pass_text=getattr(cfg, "on_unparseable", "refuse") == "pass_text")
        except Unparseable as e:
            print(f"agentgate mask: the gateway would refuse this body ({e.status}): "
                  f"{e.reason}", file=sys.stderr)
            return 2
        out = data if new is None else new
    else:
        text = data.decode("utf-8", "surrogateescape")
        out = Masked(masker, session, found).text(text).encode("utf-8", "surrogateescape")
    if args.report:
        sys.stdout.write(json.dumps({"findings": found}, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return 0

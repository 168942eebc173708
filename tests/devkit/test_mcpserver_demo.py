"""`agentgate demo` shows one MCP tool call held for a reviewer: the real devkit MCP server
behind the real gateway, the call held by the demo's rule until the demo's reviewer approves
it through the approvals API, its arguments masked before the server sees them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_demo_holds_one_mcp_tool_call_for_a_reviewer() -> None:
    p = subprocess.run([sys.executable, "-m", "addons.cli", "demo", "--json"],
                       capture_output=True, text=True, timeout=240, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    mcp = json.loads(p.stdout)["mcp"]
    held = mcp["held"]
    assert held["rule"] == "emails-need-a-reviewer"
    assert held["requester"] == "langgraph-demo-agent"
    assert (held["what"]["kind"], held["what"]["tool"]) == ("tool", "send_email")
    assert mcp["waited_for_reviewer"] is True  # not answered before the reviewer decided
    assert mcp["decision"] == "approved" and not mcp["is_error"]
    # once approved, exactly one call reached the server, its email address masked
    assert mcp["server_received"] == [{"to": "[EMAIL_1]", "subject": "Release",
                                       "body": "The build is green."}]
    assert "jane.doe@example.com" not in json.dumps(mcp)

"""`agentgate demo`: the real LangGraph agent, a real OIDC provider and a real gateway."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_demo_runs_the_langgraph_agent_through_the_gateway() -> None:
    p = subprocess.run([sys.executable, "-m", "addons.cli", "demo", "--json"],
                       capture_output=True, text=True, timeout=240, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(p.stdout)
    assert result["agent"]["answer"] == "done: webhook answered 200"
    assert not result["leaked"]
    paths = [r["path"] for r in result["upstream_received"]]
    assert paths == ["/v1/chat/completions", "/agent-events", "/v1/chat/completions"]
    for r in result["upstream_received"]:
        # the upstream saw the gateway's secret (shown redacted), never the agent's placeholder
        cred = r["headers"].get("authorization") or r["headers"].get("x-webhook-token")
        assert "<gateway secret" in cred
        assert "managed-by-agentgate" not in json.dumps(r)
    assert "<token>" in result["agent_env"]["HTTPS_PROXY"]

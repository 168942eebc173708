"""`agentgate demo`: the real LangGraph agent, a real OIDC provider and a real gateway; a
block, a held LLM call approved on the reviewers' page, and where to look, which works as
printed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from addons.devkit import demo
from addons.devkit.launch import BIN
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_demo_runs_the_langgraph_agent_through_the_gateway(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    p = subprocess.run([sys.executable, "-m", "addons.cli", "demo", "--json", "--keep"],
                       capture_output=True, text=True, timeout=240, cwd=str(ROOT))
    result = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    workdir = Path(result.get("workdir") or "/nonexistent")
    try:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert result["agent"]["answer"] == "done: webhook answered 200"
        assert not result["leaked"]
        paths = [r["path"] for r in result["upstream_received"]]
        # the agent's two model calls and its webhook, then the approved gpt-4o call; the
        # blocked bulk request never reached the upstream
        assert paths == ["/v1/chat/completions", "/agent-events", "/v1/chat/completions",
                         "/v1/chat/completions"]
        assert '"n":20' not in json.dumps(result["upstream_received"]).replace(" ", "")
        for r in result["upstream_received"]:
            # the upstream saw the gateway's secret (shown redacted), never the placeholder
            cred = r["headers"].get("authorization") or r["headers"].get("x-webhook-token")
            assert "<gateway secret" in cred
            assert "managed-by-agentgate" not in json.dumps(r)
        assert "<token>" in result["agent_env"]["HTTPS_PROXY"]

        blocked = result["blocked"]
        assert blocked["status"] == 403 and "no-bulk-generation" in blocked["message"]
        review = result["review"]
        assert review["approval_id"].startswith("ap-") and review["waiting"] is True
        assert review["approved_on_page"] and review["in_history"]
        assert review["answer"] == f"echo: {demo.HELD_ASK}"
        assert review["page"].startswith("http://127.0.0.1:") and review["page"].endswith("/ui/")

        # the human output names the page, the approval id and where to look; the
        # commands it prints work as printed
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(demo, "cli_command", lambda: str(BIN / "agentgate"))
        demo._print_human(result)
        out = capsys.readouterr().out
        assert review["page"] in out and review["history_page"] in out
        assert f"held as {review['approval_id']}" in out and demo.APPROVE_REASON in out
        assert "-> 403: agentgate: bulk generation is not allowed" in out
        assert "./run_proxy.sh dev" in out and "mitmweb" in out
        printed = [ln.strip() for ln in out.splitlines()
                   if ln.strip().startswith(str(BIN / "agentgate"))]

        def run(marker: str) -> str:
            line = next(ln for ln in printed if marker in ln)
            r = subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                               timeout=120, cwd=str(ROOT))
            assert r.returncode == 0, r.stderr[-2000:]
            return r.stdout

        session = run(f"audit sessions --db {result['recorded_in']} --session")
        rows = [ln for ln in session.splitlines() if "no-bulk-generation" in ln
                or "gpt-4o-needs-a-reviewer" in ln]
        assert len(rows) == 2 and "block" in rows[0] and "approved" in rows[1], session
        votes = run("FROM approvals")
        row = next(ln for ln in votes.splitlines() if review["approval_id"] in ln)
        assert row.split()[3:6] == ["demo-reviewer", "page", *demo.APPROVE_REASON.split()[:1]]
        assert row.rstrip().endswith(demo.APPROVE_REASON), votes
        exported = run(" export ")
        assert "wrote 2 flows" in exported
        assert (workdir / f"{demo.DEMO_SESSION}.mitm").stat().st_size > 0
    finally:
        if workdir.name.startswith("agentgate-demo-"):
            shutil.rmtree(workdir, ignore_errors=True)

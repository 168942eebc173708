"""`agentgate approvals …` against a real approvals API listener (in a thread), and docs."""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from addons.approval import cli as cli_approvals
from addons.approval.api import ApprovalsAPI
from addons.approval.config import parse_approvals
from addons.approval.store import ApprovalSpec, ApprovalStore
from addons.cli import main as cli_main
from addons.config.schema import MapSection
from tests.approval.test_addon import fake_verify

ROOT = Path(__file__).resolve().parents[2]


class Server:
    """The real ApprovalsAPI on its own event loop in a thread."""

    def __init__(self) -> None:
        self.store = ApprovalStore()
        self.loop = asyncio.new_event_loop()
        self.api = ApprovalsAPI(self.store, fake_verify)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        host, port = asyncio.run_coroutine_threadsafe(
            self.api.start("127.0.0.1", 0), self.loop).result(10)
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.api.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(["approvals", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_approve_deny(server: Server, capsys: pytest.CaptureFixture,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ApprovalSpec(rule="bulk", groups=("reviewers",), min_approvals=2)
    a = server.store.create(spec, "agent-1", {"method": "POST", "model": "gpt-4o",
                                              "url": "https://api.openai.com/v1/x"},
                            "line one\nline two")
    b = server.store.create(ApprovalSpec(rule="other", groups=("finance",)), "agent-2", {})
    monkeypatch.setenv("AGENTGATE_APPROVALS_URL", server.url)
    monkeypatch.setenv("AGENTGATE_TOKEN", "tok-alice")
    rc, out, _ = run(capsys, "list")
    assert rc == 0 and a.id in out and b.id not in out
    assert "bulk" in out and "agent-1" in out and "0/2" in out and "model=gpt-4o" in out
    rc, out, _ = run(capsys, "show", a.id)
    assert rc == 0 and "line two" in out and "0/2 from reviewers" in out
    rc, out, _ = run(capsys, "approve", a.id, "--reason", "ok")
    assert rc == 0 and "1/2" in out and "approve by alice via cli" in out
    rc, out, err = run(capsys, "approve", a.id)
    assert rc == 1 and "already_voted" in err and "409" in err
    rc, out, err = run(capsys, "approve", a.id, "--token", "tok-mallory")
    assert rc == 1 and "reviewer_not_in_group" in err
    rc, out, err = run(capsys, "deny", b.id, "--reason", "x")
    assert rc == 1 and "403" in err
    rc, out, err = run(capsys, "approve", a.id, "--token", "tok-bogus")
    assert rc == 1 and "token_invalid" in err and "tok-bogus" not in err
    rc, out, _ = run(capsys, "deny", a.id, "--reason", "changed my mind", "--token", "tok-bob",
                     "--json")
    assert rc == 0 and '"state": "denied"' in out
    assert [(v.sub, v.via) for v in a.votes] == [("alice", "cli"), ("bob", "cli")]
    rc, out, err = run(capsys, "approve", "ap-doesnotexist")
    assert rc == 1 and "404" in err
    with pytest.raises(SystemExit):
        cli_main(["approvals", "deny", a.id])  # --reason is required


def test_token_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    ns = argparse.Namespace
    monkeypatch.delenv("AGENTGATE_TOKEN", raising=False)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert cli_approvals.read_token(ns(token="abc")) == "abc"
    assert cli_approvals.read_token(ns(token="-"), io.StringIO("from-stdin\n")) == "from-stdin"
    assert cli_approvals.read_token(ns(token=None), io.StringIO("piped\n")) == "piped"
    with pytest.raises(cli_approvals.CLIError):
        cli_approvals.read_token(ns(token=None), Tty())
    monkeypatch.setenv("AGENTGATE_TOKEN", "from-env")
    assert cli_approvals.read_token(ns(token=None), Tty()) == "from-env"


def test_unreachable_api(capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run(capsys, "list", "--url", "http://127.0.0.1:9", "--token", "t")
    assert rc == 2 and "cannot reach" in err
    rc, _, err = run(capsys, "list", "--url", "ftp://x", "--token", "t")
    assert rc == 2 and "not an http(s) URL" in err


def test_readme_approvals_example_is_valid() -> None:
    text = (ROOT / "rules" / "README.md").read_text()
    section = text.split("### `approvals`", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert blocks
    for block in blocks:
        doc: dict[str, Any] = yaml.safe_load(block)
        cfg = parse_approvals(MapSection("approvals", doc["approvals"],
                                         dict.fromkeys(doc["approvals"], "README.md")))
        assert cfg.describe()


def test_list_tells_holds_apart(server: Server, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LLM hold used to read `POST https://api.openai.com/v1/chat/completions
    model=…`: now kind, model or tool and the one-line summary tell them apart."""
    spec = ApprovalSpec(rule="bulk", groups=("reviewers",))
    url = "https://api.openai.com/v1/chat/completions"
    llm = [server.store.create(spec, "agent-1", {
        "method": "POST", "url": url, "kind": "llm", "model": "gpt-4o", "summary": text})
        for text in ("make 500 customer records", "delete the staging tables " + "x" * 200)]
    tool = server.store.create(spec, "agent-1", {
        "method": "POST", "url": "https://mcp.internal/mcp", "kind": "tool",
        "tool": "delete_file", "summary": "tools/call delete_file(path)"})
    sql = server.store.create(spec, "agent-1", {
        "kind": "sql", "upstream": "orders-db", "database": "orders",
        "sql": "DELETE FROM customers WHERE id = $1"})
    monkeypatch.setenv("AGENTGATE_APPROVALS_URL", server.url)
    monkeypatch.setenv("AGENTGATE_TOKEN", "tok-alice")
    rc, out, _ = run(capsys, "list")
    assert rc == 0
    lines = {a.id: next(line for line in out.splitlines() if a.id in line)
             for a in (*llm, tool, sql)}
    assert 'LLM model=gpt-4o "make 500 customer records"' in lines[llm[0].id]
    assert '"delete the staging tables xxx' in lines[llm[1].id] and "…" in lines[llm[1].id]
    assert len(lines[llm[1].id]) < 250
    assert 'tool tool=delete_file "tools/call delete_file(path)"' in lines[tool.id]
    assert 'SQL orders-db/orders "DELETE FROM customers WHERE id = $1"' in lines[sql.id]
    server.store.approve(llm[0].id, "bob", ["reviewers"], reason="synthetic only")
    rc, out, _ = run(capsys, "show", llm[0].id)
    assert "summary:   make 500 customer records" in out
    assert "request:   POST https://api.openai.com/v1/chat/completions" in out
    assert "approve by bob via api" in out and "synthetic only" in out

"""`agentgate policy test`: dry runs over hand-written JSON and recorded .mitm flows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import http, io
from mitmproxy.test import tflow

from addons.cli import main as cli_main

RULES = """
upstreams:
  - {name: openai, hosts: [api.openai.com], dialect: openai}
  - {name: anthropic, hosts: [api.anthropic.com], dialect: anthropic}
policies:
  - name: no-gpt5
    match: {model: "gpt-5*", not: {groups: [ml]}}
    action: block
    message: restricted model
  - {name: bulk, match: {fields: {n: "> 10"}}, action: approve, approvers: [reviewers]}
  - {name: night, match: {time: {between: "22:00-06:00", tz: UTC}}, action: block}
  - {name: watch-anthropic, match: {upstream: [anthropic]}, action: observe}
"""

REQUESTS = [
    {"method": "POST", "url": "https://api.openai.com/v1/chat/completions",
     "body": {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]},
     "identity": {"sub": "agent-1", "groups": ["bots"]}},
    {"method": "POST", "url": "https://api.openai.com/v1/chat/completions",
     "body": {"model": "gpt-5", "messages": []}, "identity": {"sub": "ml-1", "groups": ["ml"]}},
    {"url": "https://api.openai.com/v1/chat/completions",
     "body": {"model": "gpt-4o", "n": 20, "messages": []}},
    {"url": "https://api.anthropic.com/v1/messages", "body": "{\"model\": \"claude\"}"},
    {"url": "https://evil.example.com/exfil"},
]


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    d.mkdir()
    (d / "r.yaml").write_text(RULES)
    return d


def run_json(capsys, *args: str) -> tuple[int, list[dict]]:
    rc = cli_main(["policy", "test", *args, "--json"])
    out = capsys.readouterr().out
    return rc, [json.loads(line) for line in out.splitlines() if line.strip()]


def test_json_requests(tmp_path: Path, rules_dir: Path, capsys) -> None:
    f = tmp_path / "reqs.json"
    f.write_text(json.dumps(REQUESTS))
    rc, rows = run_json(capsys, "--rules", str(rules_dir), str(f), "--at",
                        "2026-11-24T12:00:00")
    assert rc == 0
    got = [(r["decision"], r["rule"], r["observed"]) for r in rows]
    assert got == [("block", "no-gpt5", False), ("allow", "<default>", False),
                   ("approve", "bulk", False), ("observe", "watch-anthropic", True),
                   ("refuse", "", False)]
    assert rows[0]["message"] == "restricted model" and rows[0]["sub"] == "agent-1"
    assert rows[2]["approval"]["groups"] == ["reviewers"]
    assert rows[4]["step"] == "upstreams"
    # time of day: the same request at night hits the night rule
    rc, rows = run_json(capsys, "--rules", str(rules_dir), str(f), "--at",
                        "2026-11-24T23:00:00+00:00")
    assert rows[1]["rule"] == "night"
    # global observe-only
    rc, rows = run_json(capsys, "--rules", str(rules_dir), str(f), "--observe-only", "--at",
                        "2026-11-24T12:00:00")
    assert (rows[0]["decision"], rows[0]["observed"]) == ("block", True)


def test_table_output(tmp_path: Path, rules_dir: Path, capsys) -> None:
    f = tmp_path / "one.json"
    f.write_text(json.dumps(REQUESTS[0]))
    assert cli_main(["policy", "test", "--rules", str(rules_dir), str(f)]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split()[:6] == ["#", "METHOD", "URL", "WHO", "DECISION", "RULE"]
    assert "agent-1" in row and "block" in row and "no-gpt5" in row
    assert "restricted model" in row
    assert "1 requests; policies: 4 rules" in out


def test_mitm_file(tmp_path: Path, rules_dir: Path, capsys) -> None:
    path = tmp_path / "flows.mitm"
    flows = []
    for req in REQUESTS[:3]:
        f = tflow.tflow(resp=True)
        f.request = http.Request.make(req.get("method", "POST"), req["url"],
                                      json.dumps(req["body"]).encode(),
                                      {"content-type": "application/json"})
        if "identity" in req:
            f.metadata["identity"] = req["identity"]
        flows.append(f)
    with path.open("wb") as fh:
        w = io.FlowWriter(fh)
        for f in flows:
            w.add(f)
    rc, rows = run_json(capsys, "--rules", str(rules_dir), str(path), "--at",
                        "2026-11-24T12:00:00")
    assert rc == 0
    assert [(r["decision"], r["rule"]) for r in rows] == [
        ("block", "no-gpt5"), ("allow", "<default>"), ("approve", "bulk")]
    assert rows[0]["source"].endswith("flows.mitm#0")


def test_errors(tmp_path: Path, rules_dir: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli_main(["policy", "test", "--rules", str(rules_dir), str(bad)]) == 2
    assert "cannot read JSON" in capsys.readouterr().err
    nourl = tmp_path / "nourl.json"
    nourl.write_text(json.dumps([{"method": "GET"}]))
    assert cli_main(["policy", "test", "--rules", str(rules_dir), str(nourl)]) == 2
    assert "nourl.json[0]" in capsys.readouterr().err
    (rules_dir / "broken.yaml").write_text("policies:\n  - {name: x, action: explode}\n")
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(REQUESTS[0]))
    assert cli_main(["policy", "test", "--rules", str(rules_dir), str(ok)]) == 1
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "policies[0].action" in err

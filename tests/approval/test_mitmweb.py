"""mitmweb as an operator console, through a real mitmweb running the suite and its HTTP
command API (what the command bar calls): commands that name the hold, marks per outcome,
the decision first in the comment, no agent credential on a held flow, and flows loaded
from a file never recorded again."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.error
from pathlib import Path
from typing import Any

import duckdb
import openai
import pytest

from tests.approval.test_integration import MitmWeb

pytestmark = pytest.mark.integration

AGENT_KEY = "sk-agent-own-key-4c1d9e2f7a"  # what an agent sends that is not a token

RULES = """
policies:
  - name: no-secrets-model
    match: {model: [web-blocked]}
    action: block
    message: this model is not allowed
  - name: web-operator-may
    match: {model: [web-operator]}
    action: approve
    approvers: [reviewers]
    allow_mitmweb: true
    timeout: 60
  - name: web-quick
    match: {model: [web-quick]}
    action: approve
    approvers: [reviewers]
    timeout: 1
"""


def command(web: MitmWeb, name: str, *args: str) -> dict[str, Any]:
    try:
        return web.call("POST", f"/commands/{name}", {"arguments": list(args)})
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def flow_of(web: MitmWeb, flow_id: str) -> dict[str, Any]:
    return next(f for f in web.call("GET", "/flows") if f["id"] == flow_id)


def wait_flow(web: MitmWeb, cond: Any, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in web.call("GET", "/flows"):
            if cond(f):
                return f
        time.sleep(0.1)
    raise AssertionError("no such flow")


def test_operator_console(gateway_factory, no_identity, standin) -> None:
    gw = gateway_factory("{standin_upstreams}" + no_identity + RULES, web=True,
                         extra_args=("--set", "web_password=agentgate-pw"))
    web = MitmWeb(gw, "agentgate-pw")
    client = openai.OpenAI(api_key=AGENT_KEY, max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                                 verify=str(gw.ca_cert)))
    pool = concurrent.futures.ThreadPoolExecutor(4)

    def ask(model: str, text: str) -> concurrent.futures.Future:
        return pool.submit(lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}]))

    try:
        # -- two held requests (one with an email address the masking step replaces)
        fut1 = ask("web-operator", "write to jane.roe@example.com about the invoice")
        f1 = web.held("web-operator-may")
        fut2 = ask("web-operator", "a second, different request")
        f2 = wait_flow(web, lambda f: f.get("intercepted") and f["id"] != f1["id"])
        for f in (f1, f2):
            # a held flow shows no credential of the agent's (its own API key was stripped)
            names = {k.lower() for k, _v in f["request"]["headers"]}
            assert not names & {"authorization", "proxy-authorization", "x-api-key"}
            assert AGENT_KEY not in json.dumps(f)
            assert f["marked"] == "⌛"
            assert re.match(r"held for approval by rule web-operator-may \(ap-\w+\)",
                            f["comment"])
        id1 = re.search(r"\((ap-\w+)\)", f1["comment"]).group(1)

        # -- @focus means nothing in mitmweb: a clear error, not silence
        out = command(web, "agentgate.approve", "@focus")
        assert "approval id" in out["error"] and not fut1.done()
        # -- one command never approves several holds
        out = command(web, "agentgate.approve", "@all")
        assert "matches 2 held requests" in out["error"] and not fut1.done()
        # -- the approval id from the comment, with a reason
        command(web, "agentgate.approve", id1, "invoice mail is fine")
        assert fut1.result(30).choices[0].message.content.startswith("echo: write to")
        done1 = wait_flow(web, lambda f: f["id"] == f1["id"] and f.get("response"))
        assert done1["marked"] == "🔒"  # approved, and masked: the lock stays
        lines = done1["comment"].splitlines()
        assert lines[0] == f"approval approved by rule web-operator-may ({id1})"
        assert "approve by mitmweb-operator via mitmweb: invoice mail is fine" in lines

        # -- deny by flow id (as in mitmweb's URL)
        command(web, "agentgate.deny", f"@{f2['id']}", "not today")
        with pytest.raises(openai.PermissionDeniedError):
            fut2.result(30)
        done2 = wait_flow(web, lambda f: f["id"] == f2["id"] and f.get("response"))
        assert done2["marked"] == "🚫"
        assert done2["comment"].splitlines()[0].startswith(
            "approval denied by rule web-operator-may (ap-")

        # -- a timeout and a policy block look different
        with pytest.raises(openai.PermissionDeniedError):
            ask("web-quick", "quick").result(30)
        t = wait_flow(web, lambda f: "web-quick" in (f.get("comment") or "")
                      and f.get("response"))
        assert t["marked"] == "⏰" and t["comment"].startswith("approval timeout by rule")
        with pytest.raises(openai.PermissionDeniedError):
            ask("web-blocked", "x").result(30)
        b = wait_flow(web, lambda f: "no-secrets-model" in (f.get("comment") or ""))
        assert b["marked"] == "⛔" and b["comment"].startswith("blocked by rule no-secrets-model")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_loaded_flows_are_not_recorded_again(gateway_factory, no_identity, standin,
                                             tmp_path: Path) -> None:
    """`mitmweb -r file` with the suite used to append the loaded flows to the audit DB as
    new records; now they are shown, not recorded (nor held again)."""
    from mitmproxy import io
    from mitmproxy.test import tflow

    saved = tmp_path / "export.mitm"
    with saved.open("wb") as fp:
        w = io.FlowWriter(fp)
        for i in range(3):
            f = tflow.tflow(resp=True)
            f.request.host, f.request.path = "api.openai.com", f"/v1/chat/completions?n={i}"
            f.request.content = json.dumps({"model": "web-operator", "messages": [
                {"role": "user", "content": f"old {i}"}]}).encode()
            w.add(f)
    # mitmweb (mitmdump -r exits once the file is read; mitmweb keeps serving)
    gw = gateway_factory("{standin_upstreams}" + no_identity + RULES, web=True,
                         extra_args=("--set", "web_password=agentgate-pw", "-r", str(saved)))
    web = MitmWeb(gw, "agentgate-pw")
    wait_flow(web, lambda f: "n=2" in f["request"]["path"])
    # live traffic is still recorded
    client = openai.OpenAI(api_key="unused", max_retries=0, timeout=30,
                           http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                                 verify=str(gw.ca_cert)))
    assert gw.proc.poll() is None, gw.logs()[-3000:]
    client.chat.completions.create(model="gpt-4o-mini",
                                   messages=[{"role": "user", "content": "live"}])
    gw.stop()
    [db] = list(Path(gw.data_dir).rglob("*.duckdb"))
    con = duckdb.connect(str(db), read_only=True)
    urls = [r[0] for r in con.execute("SELECT url FROM flows").fetchall()]
    con.close()
    assert not any("n=" in u for u in urls), urls
    assert len(urls) == 1 and "chat/completions" in urls[0]


def test_run_proxy_web_r_opens_read_only(tmp_path: Path) -> None:
    """`./run_proxy.sh web -r FILE` runs mitmweb without the suite and without a proxy
    listener (a venv whose mitmweb only reports its arguments)."""
    import hashlib
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # a wrapper, not a symlink: a symlinked interpreter outside the venv does not see the
    # venv's packages, and run_proxy.sh needs mitmproxy to make the CA on a fresh clone
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (venv / "bin" / "python").chmod(0o755)
    fake = venv / "bin" / "mitmweb"
    fake.write_text('#!/bin/sh\necho "mitmweb $*"\n')
    fake.chmod(0o755)
    want = hashlib.sha256((ROOT / "setup.cfg").read_bytes()
                          + (ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / ".agentgate-deps").write_text(want + "\n")
    for args in (["-r", "export.mitm"], ["--rfile=export.mitm"], ["-rexport.mitm"]):
        p = subprocess.run(["/bin/bash", str(ROOT / "run_proxy.sh"), "web", *args],
                           env={**os.environ, "AGENTGATE_VENV": str(venv)},
                           capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("mitmweb --no-server ") and "gateway.py" not in p.stdout
        assert "read-only" in p.stderr


def test_run_proxy_web_moves_mitmweb_ui_off_the_reviewers_port(tmp_path: Path) -> None:
    """`./run_proxy.sh web` starts as the README says: mitmweb's UI would take 8081, the
    reviewers' page's port, so run_proxy moves it to 8082 (AGENTGATE_WEB_PORT) unless the
    caller set web_port."""
    import hashlib
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # a wrapper, not a symlink: a symlinked interpreter outside the venv does not see the
    # venv's packages, and run_proxy.sh needs mitmproxy to make the CA on a fresh clone
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (venv / "bin" / "python").chmod(0o755)
    for tool, script in (("mitmweb", 'echo "mitmweb $*"'), ("agentgate", "exit 0")):
        fake = venv / "bin" / tool
        fake.write_text(f"#!/bin/sh\n{script}\n")
        fake.chmod(0o755)
    want = hashlib.sha256((ROOT / "setup.cfg").read_bytes()
                          + (ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / ".agentgate-deps").write_text(want + "\n")
    env = {**os.environ, "AGENTGATE_VENV": str(venv), "AGENTGATE_DATA": str(tmp_path / "d")}
    for extra_env, args, expect in (({}, [], "web_port=8082"),
                                    ({"AGENTGATE_WEB_PORT": "9191"}, [], "web_port=9191"),
                                    ({}, ["--set", "web_port=7000"], "web_port=7000")):
        p = subprocess.run(["/bin/bash", str(ROOT / "run_proxy.sh"), "web", *args],
                           env={**env, **extra_env}, capture_output=True, text=True,
                           timeout=120, cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr
        assert "gateway.py" in p.stdout and expect in p.stdout, p.stdout
        assert p.stdout.count("web_port=") == 1, p.stdout

"""Drain on SIGTERM with one real mitmdump and no state database (holds in memory): the drain
is bounded (AGENTGATE_DRAIN_SECONDS) — a request held past it is answered 503 (never
forwarded) and the process still exits 0 with the audit flushed; an ordinary request that
finishes during the drain gets `connection: close`; probes answer as documented; a bad
probe address or drain bound stops the gateway at startup naming the option."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request

import duckdb
import openai
import pytest

from addons.devkit.launch import free_port

pytestmark = pytest.mark.integration

RULES = """{standin_upstreams}
identity:
  required: false
policies:
  - name: bulk
    match: {model: ["bulk-one"]}
    action: approve
    approvers: [reviewers]
    timeout: 60
"""


def probe(port: int, path: str, method: str = "GET") -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_drain_is_bounded_and_exits_zero(gateway_factory, standin) -> None:
    hp = free_port()
    gw = gateway_factory(RULES, env={"AGENTGATE_HEALTH_LISTEN": f"127.0.0.1:{hp}",
                                     "AGENTGATE_DRAIN_SECONDS": "2"})
    deadline = time.monotonic() + 20
    while True:
        try:
            status, body = probe(hp, "/readyz")
            if status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, gw.logs()[-2000:]
        time.sleep(0.05)
    assert body["checks"] == ["approvals", "audit", "identity_keys", "rules"]
    assert probe(hp, "/healthz")[1]["live"] is True
    assert probe(hp, "/nope")[0] == 404 and probe(hp, "/readyz", "POST")[0] == 405
    client = openai.OpenAI(api_key="unused", max_retries=0, timeout=30,
                           http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                                 verify=str(gw.ca_cert)))
    ask = lambda model: client.chat.completions.with_raw_response.create(  # noqa: E731
        model=model, messages=[{"role": "user", "content": "hi"}])
    assert ask("gpt-4o-mini").headers.get("connection") != "close"
    pool = concurrent.futures.ThreadPoolExecutor(2)
    held = pool.submit(ask, "bulk-one")
    deadline = time.monotonic() + 10
    while "holding POST" not in gw.logs():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    standin.clear()
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(15) == 0
    took = time.monotonic() - t0
    assert 1.5 < took < 10, took  # waited for the held flow, up to the 2 s bound
    with pytest.raises(openai.APIStatusError) as e:
        held.result(10)
    assert e.value.status_code == 503 and e.value.body["code"] == "approval_cancelled"
    assert standin.requests == []  # nothing held went upstream
    logs = gw.logs()
    assert "drain bound (2s) reached with 1 flow(s) in flight" in logs
    con = duckdb.connect(str(gw.data_dir / "agentgate.duckdb"), read_only=True)
    try:
        n = con.execute("SELECT count(*) FROM flows").fetchone()[0]
    finally:
        con.close()
    assert n == 2  # the ordinary request and the cancelled hold, both flushed


def test_connection_close_while_draining(gateway_factory, standin) -> None:
    hp = free_port()
    gw = gateway_factory(RULES, env={"AGENTGATE_HEALTH_LISTEN": f"127.0.0.1:{hp}",
                                     "AGENTGATE_DRAIN_SECONDS": "5"})
    client = openai.OpenAI(api_key="unused", max_retries=0, timeout=30,
                           http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                                 verify=str(gw.ca_cert)))
    ask = lambda model: client.chat.completions.with_raw_response.create(  # noqa: E731
        model=model, messages=[{"role": "user", "content": "hi"}])
    assert ask("gpt-4o-mini").http_response.status_code == 200  # keep-alive tunnel open
    held = concurrent.futures.ThreadPoolExecutor(1).submit(
        openai.OpenAI(api_key="unused", max_retries=0, timeout=30,
                      http_client=openai.DefaultHttpxClient(
                          proxy=gw.proxy_url(), verify=str(gw.ca_cert))
                      ).chat.completions.create,
        model="bulk-one", messages=[{"role": "user", "content": "hold"}])
    deadline = time.monotonic() + 10
    while "holding POST" not in gw.logs():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    gw.proc.send_signal(signal.SIGTERM)  # the held flow keeps it draining for 5 s
    while probe(hp, "/readyz")[0] != 503:
        time.sleep(0.05)
    r = ask("gpt-4o-mini")  # on the tunnel opened before the drain
    assert r.http_response.status_code == 200
    assert r.headers.get("connection") == "close"  # the client reconnects elsewhere
    assert gw.proc.wait(15) == 0
    with pytest.raises(openai.APIStatusError):
        held.result(10)


@pytest.mark.parametrize("opt", ["agentgate_health_listen=nowhere",
                                 "agentgate_drain_seconds=-1"])
def test_bad_probe_options_stop_the_gateway(tmp_path, gateway_confdir, opt) -> None:
    from tests.conftest import BIN, ROOT
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text("identity:\n  required: false\n")
    p = subprocess.run([str(BIN / "mitmdump"), "-s", str(ROOT / "addons" / "gateway.py"),
                        "--listen-port", str(free_port()), "--set", f"confdir={gateway_confdir}",
                        "--set", f"agentgate_rules={rules}", "--set",
                        f"agentgate_data={tmp_path}", "--set",
                        f"agentgate_approvals_listen=127.0.0.1:{free_port()}", "--set", opt],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert opt.split("=")[0] in p.stdout + p.stderr

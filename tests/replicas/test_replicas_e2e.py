"""Replicas through real parts: Debian's postgres (the shared state), two mitmdump gateways
with the whole suite, HAProxy in front (addons/devkit/replicas.py, as `./run_proxy.sh
replicas N` starts them), a real OIDC provider and the OpenAI SDK against the stand-in.

- a request held on one replica is decided through the other replica's API, both ways; the
  same request retried through the other replica joins that hold (one approval);
- the per-identity cap is global: a second hold of the same agent on the other replica 429s;
- requests through HAProxy spread over both replicas;
- one replica SIGKILLed mid-load: its hold is cancelled in the shared store (seen from the
  survivor), nothing that reached the survivor is lost, the survivor keeps serving;
- SIGTERM drains: readyz 503, no new connections, the held flow is still released by a
  decision made on the other replica, the audit row is flushed, exit code 0;
- a LangGraph agent (the demo's) through HAProxy: its runs spread over both replicas;
- the state database unreachable: not ready, holds refused with 503 in the caller's dialect
  (never forwarded), other requests still served.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import duckdb
import openai
import pytest

from addons.devkit.launch import free_port, standin_upstreams_yaml
from addons.devkit.replicas import Cluster, Replica, start_cluster, start_replica
from tests.conftest import GATEWAY_ENV

pytestmark = pytest.mark.integration

POLICIES = """
policies:
  - name: bulk
    match: {model: ["bulk-one"]}
    action: approve
    approvers: [reviewers]
    timeout: 60
approvals:
  max_pending_per_identity: 1
"""


@pytest.fixture
def cluster(tmp_path: Path, gateway_confdir: Path, standin, oidc_provider):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(standin_upstreams_yaml(standin)
                                      + oidc_provider.identity_yaml() + POLICIES)
    c = start_cluster(2, rules, gateway_confdir, tmp_path / "data",
                      standin_ca=standin.ca_path,
                      # the drain test decides a held flow while its replica drains
                      gateway_env={**GATEWAY_ENV, "AGENTGATE_DRAIN_SECONDS": "25"})
    yield c
    c.stop()


def tokens(oidc_provider) -> dict[str, str]:
    return {"agent": oidc_provider.token(sub="agent-7", groups=["agents"]),
            "alice": oidc_provider.token(sub="alice", groups=["reviewers"])}


def client(port: int, token: str, ca: Path) -> openai.OpenAI:
    # a new HTTP client (a new connection, so HAProxy picks a replica) per call
    return openai.OpenAI(api_key="unused", max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(
                             proxy=f"http://agent:{token}@127.0.0.1:{port}", verify=str(ca)))


def ask(port: int, token: str, ca: Path, model: str, text: str = "hello") -> Any:
    return client(port, token, ca).chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}])


def api(r: Replica, method: str, path: str, token: str,
        body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    url = r.gateway.approvals_url
    assert url, r.gateway.logs()[-2000:]
    req = urllib.request.Request(url + path, method=method,
                                 data=json.dumps(body).encode() if body else None)
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def wait_pending(r: Replica, token: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, out = api(r, "GET", "/approvals", token)
        assert status == 200, out
        if out["approvals"]:
            return out["approvals"][0]
        time.sleep(0.05)
    raise AssertionError("no pending approval on " + r.name)


def probe(r: Replica, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{r.probe_port}{path}", timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def served(r: Replica) -> int:
    return r.gateway.logs().count("/v1/chat/completions")


def test_decided_on_the_other_replica_global_cap_and_spread(cluster: Cluster, oidc_provider,
                                                            standin) -> None:
    t = tokens(oidc_provider)
    a, b = cluster.replicas
    ca = a.gateway.ca_cert
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        for holder, decider, verdict in ((a, b, "approve"), (b, a, "deny")):
            fut = pool.submit(ask, holder.gateway.port, t["agent"], ca, "bulk-one", "big job")
            pending = wait_pending(decider, t["alice"])  # the other replica lists it
            assert pending["requester"] == "agent-7" and "big job" in pending["preview"]
            # the per-identity cap (1) is global: the same agent on the other replica
            with pytest.raises(openai.RateLimitError) as e:
                ask(decider.gateway.port, t["agent"], ca, "bulk-one", "another")
            assert e.value.body["code"] == "approval_quota_exceeded"
            # the same request retried through the other replica joins the hold (one
            # approval across replicas; no quota taken)
            copy = pool.submit(ask, decider.gateway.port, t["agent"], ca, "bulk-one",
                               "big job")
            deadline = time.monotonic() + 10
            while "on another replica: joined" not in decider.gateway.logs():
                assert time.monotonic() < deadline and not copy.done(), decider.gateway.logs()
                time.sleep(0.05)
            assert len(api(decider, "GET", "/approvals", t["alice"])[1]["approvals"]) == 1
            t0 = time.monotonic()
            body = {"reason": "ok"} if verdict == "approve" else {"reason": "no thanks"}
            status, out = api(decider, "POST", f"/approvals/{pending['id']}/{verdict}",
                              t["alice"], body)
            assert status == 200, out
            for f in (fut, copy):
                if verdict == "approve":
                    assert f.result(10).choices[0].message.content == "echo: big job"
                else:
                    with pytest.raises(openai.PermissionDeniedError) as e:
                        f.result(10)
                    assert e.value.body["code"] == "approval_denied"
                    assert "no thanks" in str(e.value)
            assert time.monotonic() - t0 < 1.5  # released on the holding replica
        # spread: new connections through HAProxy land on both replicas
        before = (served(a), served(b))
        for _ in range(10):
            assert ask(cluster.port, t["agent"], ca, "gpt-4o-mini").choices
        time.sleep(0.3)
        assert served(a) - before[0] >= 3 and served(b) - before[1] >= 3
        assert probe(a, "/readyz")[0] == 200 and probe(a, "/healthz")[0] == 200
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_sigkill_mid_load(cluster: Cluster, oidc_provider) -> None:
    t = tokens(oidc_provider)
    a, b = cluster.replicas
    ca = a.gateway.ca_cert
    held: dict[str, Any] = {}

    def hold() -> None:
        try:
            ask(a.gateway.port, t["agent"], ca, "bulk-one", "held on a")
            held["result"] = "answered"
        except Exception as e:  # noqa: BLE001 - the replica dies under it
            held["result"] = type(e).__name__

    threading.Thread(target=hold, daemon=True).start()
    pending = wait_pending(b, t["alice"])
    results: list[tuple[float, bool]] = []
    stop = threading.Event()

    def load() -> None:
        other = oidc_provider.token(sub="agent-9", groups=["agents"])
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                ok = ask(cluster.port, other, ca, "gpt-4o-mini").choices[0].message.content \
                    == "echo: hello"
            except Exception:  # noqa: BLE001 - counted
                ok = False
            results.append((t0, ok))

    loaders = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for th in loaders:
        th.start()
    time.sleep(2)
    killed_at = time.monotonic()
    a.gateway.proc.send_signal(signal.SIGKILL)
    a.gateway.proc.wait(10)
    time.sleep(4)
    stop.set()
    for th in loaders:
        th.join(70)
    # the survivor reaps the dead replica's hold once its lease (10 s) runs out
    deadline = time.monotonic() + 25
    while True:
        status, out = api(b, "GET", f"/approvals/{pending['id']}", t["alice"])
        assert status == 200, out
        if out["approval"]["state"] == "cancelled":
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.2)
    assert "stopped" in out["approval"]["reason"]
    assert held["result"] != "answered"
    # nothing but what was in flight on the killed replica is lost: at most one request
    # per loader thread, and none that started after HAProxy noticed (2 checks of 0.5 s)
    failed = [t0 for t0, ok in results if not ok]
    assert len(failed) <= 2, (len(failed), len(results))
    assert not [t0 for t0 in failed if t0 > killed_at + 1.5]
    assert sum(ok for t0, ok in results if t0 > killed_at + 1.5) >= 5
    # the survivor still holds and releases
    fut = concurrent.futures.ThreadPoolExecutor(1).submit(
        ask, b.gateway.port, t["agent"], ca, "bulk-one", "after")
    p2 = wait_pending(b, t["alice"])
    assert api(b, "POST", f"/approvals/{p2['id']}/approve", t["alice"], {})[0] == 200
    assert fut.result(10).choices[0].message.content == "echo: after"


def test_sigterm_drains(cluster: Cluster, oidc_provider) -> None:
    t = tokens(oidc_provider)
    a, b = cluster.replicas
    ca = a.gateway.ca_cert
    fut = concurrent.futures.ThreadPoolExecutor(1).submit(
        ask, a.gateway.port, t["agent"], ca, "bulk-one", "finish me")
    pending = wait_pending(b, t["alice"])
    a.gateway.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while probe(a, "/readyz")[0] != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "drain" in probe(a, "/readyz")[1]["failed"]
    assert probe(a, "/healthz")[0] == 200  # still live while it drains
    deadline = time.monotonic() + 5
    while True:  # the proxy listener is closed: no new connections
        try:
            socket.create_connection(("127.0.0.1", a.gateway.port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert a.gateway.proc.poll() is None  # the held flow keeps it draining
    assert api(b, "POST", f"/approvals/{pending['id']}/approve", t["alice"], {})[0] == 200
    assert fut.result(10).choices[0].message.content == "echo: finish me"
    assert a.gateway.proc.wait(20) == 0
    assert "drained; stopping" in a.gateway.logs()
    con = duckdb.connect(str(a.gateway.data_dir / "agentgate.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT count(*) FROM flows WHERE status = 200").fetchone()[0]
    finally:
        con.close()
    assert rows >= 1  # the drained flow's row was flushed before exit
    # the other replica serves on
    assert ask(cluster.port, t["agent"], ca, "gpt-4o-mini").choices


def test_state_database_down(tmp_path: Path, gateway_confdir: Path, standin,
                             oidc_provider) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(standin_upstreams_yaml(standin)
                                      + oidc_provider.identity_yaml() + POLICIES)
    dead = f"postgresql://agentgate:pw-not-logged@127.0.0.1:{free_port()}/postgres"
    r = start_replica("lonely", rules, gateway_confdir, tmp_path / "data", dead, tmp_path,
                      standin_ca=standin.ca_path, gateway_env=GATEWAY_ENV)
    try:
        t = tokens(oidc_provider)
        deadline = time.monotonic() + 10
        while probe(r, "/readyz")[1].get("failed", {}).get("identity_keys"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status, out = probe(r, "/readyz")
        assert status == 503 and set(out["failed"]) == {"approvals"}, out
        with pytest.raises(openai.InternalServerError) as e:
            ask(r.gateway.port, t["agent"], r.gateway.ca_cert, "bulk-one", "hold me")
        assert e.value.status_code == 503
        assert e.value.body["code"] == "approval_store_unavailable"
        assert ask(r.gateway.port, t["agent"], r.gateway.ca_cert, "gpt-4o-mini").choices
        assert "pw-not-logged" not in r.gateway.logs()
    finally:
        assert r.gateway.stop() == 0


def test_langgraph_agent_calls_spread_across_replicas(cluster: Cluster, oidc_provider) -> None:
    """The demo's LangGraph agent (langchain-openai ChatOpenAI + a webhook tool), configured
    only with HTTPS_PROXY = HAProxy and the CA: every run completes, and the runs' connections
    land on both replicas."""
    a, b = cluster.replicas
    token = oidc_provider.token(sub="agent-lg", groups=["agents"])
    env = a.gateway.client_env(token)
    proxy = f"http://agent:{token}@127.0.0.1:{cluster.port}"
    env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy)
    before = {r.name: r.gateway.logs().count("/agent-events") + served(r)
              for r in cluster.replicas}
    for i in range(4):
        p = subprocess.run([sys.executable, "-m", "addons.devkit.agent",
                            f"Tell the team build {i} is green."], env=env,
                           capture_output=True, text=True, timeout=120,
                           cwd=str(Path(__file__).resolve().parents[2]))
        assert p.returncode == 0, p.stdout + p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["answer"] == "done: webhook answered 200", out
    time.sleep(0.3)
    after = {r.name: r.gateway.logs().count("/agent-events") + served(r)
             for r in cluster.replicas}
    assert all(after[n] > before[n] for n in after), (before, after)

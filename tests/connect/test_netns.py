"""Acceptance of issue 12: a long-running agent with rotating tokens and no way around the
gateway, on this machine, with real processes.

`test_agent_in_a_network_namespace_only_reaches_the_gateway` (needs root and `ip netns`):
the test creates a network namespace for the agent with loopback and ONE veth pair to the
host (a /30, no default route), runs the gateway outside on the host end of the veth, the
local OIDC issuer outside issuing short tokens (TOKEN_LIFETIME s) that a thread rotates into a
file every ROTATE_EVERY s, and inside the namespace the connector (`agentgate connect`, reading
that file) and a Python LangGraph agent whose ChatOpenAI client is built once and called every
~2 s for AGENTGATE_SOAK_SECONDS (default 200). The gateway retires tunnels RETIRE_BEFORE s
ahead of their token's exp, so the SDK pool reconnects through the connector with the current
token. Asserted: no failed call (the client has max_retries=0: nothing is hidden by retries),
every call arrived at the stand-in upstream once and is recorded in DuckDB under the agent's
`sub`, several token generations were used (each token carries its generation in `groups`,
which the recorder keeps), no token in any log; and from inside the namespace, clients that
ignore the proxy (aiohttp without trust_env, raw sockets, psql, DNS) reach nothing: a decoy
listener on the host's own address accepts no connection and the stand-in records no request.

Known limit of this setup (no nftables/iptables on the test machine): a service listening on
0.0.0.0 of the host is reachable from the namespace through the host end of the veth, as the
gateway is. The Kubernetes NetworkPolicy in deploy/ restricts the port as well.

`test_rotation_soak_over_loopback` is the same rotation test without a namespace (always runs,
AGENTGATE_LOOPBACK_SOAK_SECONDS, default min(AGENTGATE_SOAK_SECONDS, 40)).

Beside the Python agent, in both tests, a LangGraph JS agent (`@langchain/langgraph` StateGraph
with one ChatOpenAI node, packages pinned for Node 20) runs under the project's Node preload
(addons/connect/node/agentgate-proxy.mjs) with its own identity, token file and connector.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest

from tests.conftest import REAL_OPENAI_KEY
from tests.connect.helpers import ensure_preload_deps, free_port, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# The soak proves rotation across the token lifetime: what counts is how many rotations and
# lifetimes a run spans, not its seconds. Tokens live 30 s (the short end of the 30-60 s the
# issue asks for) and rotate every 10 s, so the default 200 s spans the same 20 rotations and
# 6.7 lifetimes that 300 s did at 45/15 s, and the loopback run's 40 s the same 4 rotations as
# its former 60 s; the retirement lead keeps its share of the lifetime (10/45 -> 7/30).
SOAK = float(os.environ.get("AGENTGATE_SOAK_SECONDS", "200"))
LOOPBACK_SOAK = float(os.environ.get("AGENTGATE_LOOPBACK_SOAK_SECONDS", str(min(SOAK, 40.0))))
TOKEN_LIFETIME = 30   # the issue asks for 30-60 s tokens
ROTATE_EVERY = 10     # a fresh token lands in the file this often (kubelet-style atomic swap)
RETIRE_BEFORE = 7     # the gateway retires a tunnel this long before its token's exp
SUB = "system:serviceaccount:agents:research-agent"

# A LangGraph agent: the graph and its ChatOpenAI client are built ONCE, then invoked every ~2 s.
# Configured by the environment only (HTTPS_PROXY = the connector, SSL_CERT_FILE = the gateway's
# CA); the key is a placeholder. Prints one JSON line per failure and a summary at the end.
AGENT = textwrap.dedent("""
    import json, sys, time
    from langchain_openai import ChatOpenAI
    from langgraph.graph import START, MessagesState, StateGraph
    llm = ChatOpenAI(model="gpt-4o-mini", api_key="sk-placeholder", max_retries=0, timeout=30)
    def model(state):
        return {"messages": [llm.invoke(state["messages"])]}
    g = StateGraph(MessagesState)
    g.add_node("model", model)
    g.add_edge(START, "model")
    graph = g.compile()
    deadline = time.monotonic() + float(sys.argv[1])
    ok = failed = 0
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            out = graph.invoke({"messages": [("user", f"call {i}")]})
            answer = out["messages"][-1].content
            if answer != f"echo: call {i}":
                raise AssertionError(f"unexpected answer {answer!r}")
            ok += 1
        except Exception as e:
            failed += 1
            print(json.dumps({"call": i, "error": f"{type(e).__name__}: {e}"}), flush=True)
        time.sleep(2)
    print(json.dumps({"ok": ok, "failed": failed}), flush=True)
""")

# Clients that ignore HTTPS_PROXY, run inside the namespace. Each probe prints whether it got
# through; the test also checks on the other side that nothing arrived.
PROBES = textwrap.dedent("""
    import asyncio, json, socket, subprocess, sys
    import aiohttp
    t = json.loads(sys.argv[1])
    out = {}
    async def http(url):
        async with aiohttp.ClientSession(trust_env=False) as s:  # ignores HTTPS_PROXY
            async with s.get(url, timeout=aiohttp.ClientTimeout(total=5), ssl=False) as r:
                return r.status
    # "reached" unless the connection itself could not be made: any later failure (TLS, a
    # closed connection, an HTTP error) means bytes got through
    for name, url in t["urls"].items():
        try:
            out[name] = {"reached": True, "status": asyncio.run(http(url))}
        except Exception as e:
            no_conn = (isinstance(e, aiohttp.ClientConnectorError)
                       and not isinstance(e, aiohttp.ClientSSLError))
            out[name] = {"reached": not no_conn, "error": f"{type(e).__name__}: {e}"}
    for name, (host, port) in t["tcp"].items():
        try:
            socket.create_connection((host, port), timeout=5).close()
            out[name] = {"reached": True}
        except OSError as e:
            out[name] = {"reached": False, "error": f"{type(e).__name__}: {e}"}
    try:
        socket.getaddrinfo("api.openai.com", 443)
        out["dns"] = {"reached": True}
    except OSError as e:
        out["dns"] = {"reached": False, "error": f"{type(e).__name__}: {e}"}
    for name, (host, port) in t["psql"].items():
        p = subprocess.run(["psql", f"host={host} port={port} user=agent dbname=agent "
                            "connect_timeout=5 sslmode=disable", "-c", "select 1"],
                           capture_output=True, text=True, timeout=30)
        no_conn = any(m in p.stderr for m in ("Network is unreachable", "Connection refused",
                                               "No route to host", "could not translate"))
        out[name] = {"reached": p.returncode == 0 or not no_conn, "error": p.stderr[-300:]}
    print(json.dumps(out))
""")


class TokenRotator:
    """Writes a fresh token for `sub` into `path` every ROTATE_EVERY s (atomic replace, like the
    kubelet's symlink swap). Token n carries groups ["<label>-token-<n>"]: the recorder keeps
    groups, so the audit log shows which token each flow used."""

    def __init__(self, issuer, path: Path, sub: str, label: str) -> None:
        self.issuer = issuer
        self.path = path
        self.sub = sub
        self.label = label
        self.tokens: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="token-rotator")

    def write(self) -> None:
        tok = self.issuer.token(sub=self.sub,
                                groups=[f"{self.label}-token-{len(self.tokens) + 1}"],
                                expires_in=TOKEN_LIFETIME)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(tok)
        os.replace(tmp, self.path)
        self.tokens.append(tok)

    def _run(self) -> None:
        while not self._stop.wait(ROTATE_EVERY):
            self.write()

    def __enter__(self) -> TokenRotator:
        self.write()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class AgentSpec:
    """One agent process with its own identity, token file and connector."""
    label: str
    sub: str
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)


def python_agent(tmp_path: Path, seconds: float) -> AgentSpec:
    return AgentSpec("py", SUB, [sys.executable, "-c", AGENT, str(seconds)], tmp_path,
                     {"PYTHONPATH": str(ROOT)})


def rules(local_issuer) -> dict[str, str]:
    return {"upstreams.yaml": "{standin_upstreams}",
            "identity.yaml": local_issuer.identity_yaml() + f"  retire_before: {RETIRE_BEFORE}s\n",
            "misc.yaml": "approvals:\n  listen: \"off\"\nrecorder:\n  batch_interval_ms: 20\n"}


def wait_listening(log: Path, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "listening on" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{what} did not start:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen, kill: bool = False) -> None:
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run_soak(tmp_path: Path, gw, gw_host: str, local_issuer, standin, seconds: float,
             agents: list[AgentSpec], wrap: tuple[str, ...] = (),
             first_port: int | None = None) -> list[dict]:
    """For each agent: a token file rotating all along, a connector and the agent (both under
    `wrap`, e.g. `ip netns exec NS`), all agents at once against the gateway at
    gw_host:gw.port. Returns per agent its summary, failure lines, tokens and logs."""
    with ExitStack() as stack:
        conns: list[subprocess.Popen] = []
        procs: list[subprocess.Popen] = []
        stack.callback(lambda: [stop(c) for c in conns])
        stack.callback(lambda: [stop(a, kill=True) for a in procs])
        rots, envs, logs = [], [], []
        for n, spec in enumerate(agents):
            token_path = tmp_path / f"agentgate-token-{spec.label}"
            rots.append(stack.enter_context(
                TokenRotator(local_issuer, token_path, spec.sub, spec.label)))
            port = first_port + n if first_port else free_port()
            log = tmp_path / f"connect-{spec.label}.log"
            logs.append(log)
            with open(log, "wb") as cl:
                conns.append(subprocess.Popen(
                    [*wrap, sys.executable, "-m", "addons.cli", "connect", "--gateway",
                     f"http://{gw_host}:{gw.port}", "--listen", f"127.0.0.1:{port}",
                     "--token-file", str(token_path)], cwd=ROOT, stdout=cl,
                    stderr=subprocess.STDOUT))
            env = gw.client_env()  # CA variables; the proxy is set to the connector below
            # both spellings: an empty lowercase https_proxy cancels HTTPS_PROXY (urllib, httpx)
            proxy = f"http://127.0.0.1:{port}"
            env.update(HTTPS_PROXY=proxy, https_proxy=proxy, HTTP_PROXY=proxy, http_proxy=proxy,
                       OPENAI_API_KEY="sk-placeholder", NODE_EXTRA_CA_CERTS=str(gw.ca_cert))
            env.update(spec.env)
            envs.append(env)
        for conn, log in zip(conns, logs, strict=True):
            wait_listening(log, conn, "agentgate connect")
        standin.clear()
        for spec, env in zip(agents, envs, strict=True):
            procs.append(subprocess.Popen([*wrap, *spec.argv], env=env, cwd=spec.cwd,
                                          text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE))
        outs = [p.communicate(timeout=seconds + 180) for p in procs]
    results = []
    for spec, proc, (out, err), rot, log in zip(agents, procs, outs, rots, logs, strict=True):
        lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
        assert proc.returncode == 0 and lines, \
            f"{spec.label} agent exited {proc.returncode}:\n{out}\n{err}"
        results.append({"spec": spec, "summary": lines[-1], "failures": lines[:-1],
                        "stderr": err, "tokens": list(rot.tokens),
                        "connect_log": log.read_text(errors="replace")})
    return results


def check_soak(results: list[dict], gw, standin) -> None:
    for r in results:
        assert r["failures"] == [] and r["summary"]["failed"] == 0, (r["spec"].label,
                                                                    r["failures"])
        assert r["summary"]["ok"] >= 3
    total = sum(r["summary"]["ok"] for r in results)
    # the upstream got every call once, with the gateway's key, never a token or the placeholder
    reqs = standin.requests
    assert [r["path"] for r in reqs] == ["/v1/chat/completions"] * total
    for r in reqs:
        assert dict(r["headers"])["authorization"] == f"Bearer {REAL_OPENAI_KEY}"
        assert "sk-placeholder" not in str(r)
    assert gw.stop() == 0
    con = duckdb.connect(str(gw.data_dir / "agentgate.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT identity_sub, identity_groups, status FROM flows "
                           "ORDER BY started").fetchall()
    finally:
        con.close()
    assert len(rows) == total
    assert {status for _, _, status in rows} == {200}
    for r in results:
        spec = r["spec"]
        mine = [g for sub, g, _ in rows if sub == spec.sub]
        assert len(mine) == r["summary"]["ok"]  # every call under its agent's identity
        used = {tuple(g) for g in mine}
        # each flow carried one of this agent's tokens, and more than one was used: rotation
        assert all(len(g) == 1 and g[0].startswith(f"{spec.label}-token-") for g in used), used
        assert len(used) > 1, f"{spec.label}: one token for the whole run: {used}"
        for blob in (r["connect_log"], r["stderr"], gw.logs()):
            for tok in r["tokens"]:
                assert tok not in blob


# ---------------------------------------------------------------- the JS agent (Node preload)
NODE_DIR = ROOT / "addons" / "connect" / "node"
PRELOAD = NODE_DIR / "agentgate-proxy.mjs"
# LangGraph JS, pinned exactly, every package (and every transitive one: installed with
# --engine-strict) runnable on Node 20: @langchain/openai 1.5.9+ and openai 7.x need Node >= 22.
# openai is pinned as well so npm cannot pick a newer 6.x than the one tested in test_node.py.
JS_PACKAGES = ("@langchain/langgraph@1.7.3", "@langchain/openai@1.5.8", "@langchain/core@1.4.0",
               "openai@6.49.0")
SUB_JS = "system:serviceaccount:agents:research-agent-js"

# A LangGraph JS agent, unchanged code as a user writes it: a StateGraph with one model node
# calling ChatOpenAI (default baseURL api.openai.com, OPENAI_API_KEY a placeholder from the
# environment); graph and model built ONCE, invoked every ~2 s; maxRetries 0 so nothing is
# hidden by retries. Configured by the environment and NODE_OPTIONS=--import <preload> only.
JS_AGENT = """
import { ChatOpenAI } from '@langchain/openai'
import { END, MessagesAnnotation, START, StateGraph } from '@langchain/langgraph'
const llm = new ChatOpenAI({ model: 'gpt-4o-mini', maxRetries: 0, timeout: 30000 })
const graph = new StateGraph(MessagesAnnotation)
  .addNode('model', async (state) => ({ messages: [await llm.invoke(state.messages)] }))
  .addEdge(START, 'model')
  .addEdge('model', END)
  .compile()
const deadline = Date.now() + Number(process.argv[2]) * 1000
let ok = 0, failed = 0, i = 0
while (Date.now() < deadline) {
  i++
  try {
    const out = await graph.invoke({ messages: [{ role: 'user', content: `js call ${i}` }] })
    const answer = out.messages[out.messages.length - 1].content
    if (answer !== `echo: js call ${i}`) throw new Error(`unexpected answer ${answer}`)
    ok++
  } catch (e) {
    failed++
    console.log(JSON.stringify({ call: i, error: String(e) }))
  }
  await new Promise(resolve => setTimeout(resolve, 2000))
}
console.log(JSON.stringify({ ok, failed }))
"""


def _npm(args: list[str], cwd: Path) -> None:
    p = subprocess.run(["npm", *args, "--no-audit", "--no-fund"], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        pytest.fail(f"npm {' '.join(args)} in {cwd} failed: {p.stderr[-2000:]}")


@pytest.fixture(scope="module")
def js_project(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The preload's pinned undici and a throwaway project with the pinned LangGraph JS packages,
    installed on the host (the namespace has no way to the npm registry). None when the
    project ships no preload or node/npm are missing: the soak then runs the Python agent."""
    if not (PRELOAD.exists() and shutil.which("node") and shutil.which("npm")):
        return None
    # `npm ci` wipes node_modules first: only when the pinned version is not there, and under
    # a lock, so another process using the preload right now is not broken under its feet
    err = ensure_preload_deps()
    if err is not None:
        pytest.fail(f"npm ci --omit=dev in {NODE_DIR} failed: {err}")
    proj = tmp_path_factory.mktemp("js-agent")
    (proj / "package.json").write_text(json.dumps({"name": "agent", "private": True,
                                                   "type": "module"}))
    _npm(["install", "--save-exact", "--engine-strict", *JS_PACKAGES], proj)
    (proj / "agent.mjs").write_text(JS_AGENT)
    return proj


def soak_agents(tmp_path: Path, js_project: Path | None, seconds: float) -> list[AgentSpec]:
    agents = [python_agent(tmp_path, seconds)]
    if js_project is not None:
        agents.append(AgentSpec("js", SUB_JS, ["node", "agent.mjs", str(seconds)], js_project,
                                {"NODE_OPTIONS": f"--import {PRELOAD}"}))
    return agents


# ---------------------------------------------------------------- loopback (always runs)
@pytest.mark.timeout(LOOPBACK_SOAK + 300)
def test_rotation_soak_over_loopback(tmp_path, gateway_factory, local_issuer, standin,
                                     js_project) -> None:
    gw = gateway_factory(rules(local_issuer))
    agents = soak_agents(tmp_path, js_project, LOOPBACK_SOAK)
    results = run_soak(tmp_path, gw, "127.0.0.1", local_issuer, standin, LOOPBACK_SOAK, agents)
    check_soak(results, gw, standin)


# ---------------------------------------------------------------- network namespace
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def netns_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating a network namespace and a veth pair needs root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return None


@contextmanager
def agent_netns() -> Iterator[tuple[str, str, str]]:
    """(namespace, host-side IP, agent-side IP): loopback + one veth pair on a /30, no default
    route. Removed (namespace and veth) whatever happens."""
    tag = secrets.token_hex(3)
    ns, host_if, agent_if = f"agentgate-{tag}", f"agh{tag}", f"aga{tag}"
    net = 64 + secrets.randbelow(128)
    sub = 4 * secrets.randbelow(64)
    host_ip, agent_ip = f"10.{net}.0.{sub + 1}", f"10.{net}.0.{sub + 2}"
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here: {made.stderr.strip()}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", agent_if, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{agent_ip}/30", "dev", agent_if)
        _ip("-n", ns, "link", "set", agent_if, "up")
        routes = _ip("-n", ns, "route", "show").stdout
        assert "default" not in routes, routes  # the only way out is the veth's /30
        yield ns, host_ip, agent_ip
    finally:
        _ip("netns", "del", ns, check=False)          # takes the agent end of the veth with it
        _ip("link", "del", host_if, check=False)      # normally gone already
        assert ns not in _ip("netns", "list", check=False).stdout


def host_address() -> str | None:
    """An address of this host outside loopback and outside the test's veth (the route out)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET: no packet sent for UDP connect
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


class Decoy:
    """A TCP listener on the host counting the connections it accepts."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted = 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.close()

    def close(self) -> None:
        self.sock.close()


def start_gateway_on(gateway_factory, rules_files: dict[str, str], host: str):
    """The gateway listening on the host end of the veth only (launch.start_gateway waits on
    127.0.0.1, so wait here on the veth address instead)."""
    gw = gateway_factory(rules_files, extra_args=("--listen-host", host), wait=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise AssertionError(f"mitmdump exited {gw.proc.returncode}:\n{gw.logs()}")
        if "proxy listening" in gw.logs():
            try:
                socket.create_connection((host, gw.port), timeout=0.5).close()
                return gw
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"mitmdump did not start on {host}:\n{gw.logs()}")


@pytest.mark.timeout(SOAK + 360)
def test_agent_in_a_network_namespace_only_reaches_the_gateway(
        tmp_path, gateway_factory, local_issuer, standin, js_project) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"{reason}; test_rotation_soak_over_loopback covers the rotation")
    with agent_netns() as (ns, host_ip, _agent_ip):
        gw = start_gateway_on(gateway_factory, rules(local_issuer), host_ip)
        wrap = ("ip", "netns", "exec", ns)
        agents = soak_agents(tmp_path, js_project, SOAK)
        results = run_soak(tmp_path, gw, host_ip, local_issuer, standin, SOAK, agents,
                           wrap=wrap, first_port=8888)
        check_soak(results, gw, standin)

        # no way around: clients that ignore the proxy, from inside the namespace
        outside = host_address()
        decoy = Decoy(outside) if outside else None
        try:
            if decoy is not None:  # positive control: from the host the decoy answers
                socket.create_connection((decoy.host, decoy.port), timeout=5).close()
                assert wait_for(lambda: decoy.accepted == 1)
            targets: dict = {
                "urls": {"aiohttp-openai": "https://api.openai.com/v1/models",
                         "aiohttp-standin": standin.url + "/v1/models"},
                "tcp": {"standin": [standin.host, standin.port],
                        "internet": ["1.1.1.1", 443],
                        "local-postgres": ["127.0.0.1", 5432]},
                "psql": {},
            }
            if decoy is not None:
                targets["tcp"]["host-address"] = [decoy.host, decoy.port]
            if shutil.which("psql"):  # postgresql-client; the raw sockets cover it otherwise
                targets["psql"]["psql-local"] = ["127.0.0.1", 5432]
                if decoy is not None:
                    targets["psql"]["psql-host"] = [decoy.host, decoy.port]
            before = decoy.accepted if decoy is not None else 0
            standin.clear()
            env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
            p = subprocess.run([*wrap, sys.executable, "-c", PROBES, json.dumps(targets)],
                               capture_output=True, text=True, timeout=180, env=env)
            assert p.returncode == 0, p.stderr
            got = json.loads(p.stdout.strip().splitlines()[-1])
            assert set(got) == {*targets["urls"], *targets["tcp"], *targets["psql"], "dns"}
            assert [n for n, r in got.items() if r["reached"]] == [], got
            if decoy is not None:
                assert decoy.accepted == before  # nothing arrived on the host's own address
            assert standin.requests == []
        finally:
            if decoy is not None:
                decoy.close()

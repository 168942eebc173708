"""Recorder through a real mitmdump: real SDK clients, the CLI while the gateway runs,
export + replay with real mitmdump processes, SIGTERM under load, no leaked credentials."""

from __future__ import annotations

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

import duckdb
import openai
import pytest

from tests.conftest import BIN, GATEWAY_ENV, ROOT, Gateway, free_port

pytestmark = pytest.mark.integration

AGENT_KEY = "sk-agent-side-key-that-must-never-reach-the-store-0000"
EMAIL = "jane.roe.recorder@example.com"


def rules(recorder: str = "") -> str:
    # approvals API off: a fixed default port would collide between parallel gateways
    return ("{standin_upstreams}" + "identity:\n  required: false\n"
            + "approvals:\n  listen: \"off\"\n"
            + "recorder:\n  batch_interval_ms: 20\n" + recorder)


RULES = rules()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def sdk(proxy: str, ca: Path, session: str | None = None) -> openai.OpenAI:
    headers = {"X-Agent-Session": session} if session else None
    return openai.OpenAI(api_key=AGENT_KEY, max_retries=0, timeout=30, default_headers=headers,
                         http_client=openai.DefaultHttpxClient(proxy=proxy, verify=str(ca)))


def db_of(gw: Gateway) -> Path:
    return gw.data_dir / "agentgate.duckdb"


def assert_no_secrets(*paths: Path, values: tuple[str, ...] = ()) -> None:
    """No real credential (nor the agent's key) in the files' bytes, nor — because DuckDB
    may store strings compressed, where a byte grep could miss them — in any column."""
    values = (*GATEWAY_ENV.values(), AGENT_KEY, *values)
    for p in paths:
        for f in [p] + sorted(p.parent.glob(p.name + ".wal")):
            data = f.read_bytes()
            for value in values:
                assert value.encode() not in data, f"{value[:12]}… leaked into {f}"
        if p.suffix == ".duckdb":
            con = duckdb.connect(str(p), read_only=True)
            try:
                # schema 2: bodies over 4 KiB live in blobs; flow_bodies reassembles them
                tables = [r[0] for r in con.execute("SELECT table_name FROM "
                                                    "information_schema.tables").fetchall()]
                for table in [t for t in ("flows", "approvals", "blobs", "flow_bodies")
                              if t in tables]:
                    cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
                    for value in values:
                        hits = con.execute(
                            f"SELECT count(*) FROM {table} WHERE "
                            + " OR ".join(f"position(? IN CAST({c} AS VARCHAR)) > 0"
                                          for c in cols), [value] * len(cols)).fetchone()[0]
                        assert hits == 0, f"{value[:12]}… stored in {table}"
            finally:
                con.close()


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("process did not listen")


@pytest.fixture
def gw(gateway_factory) -> Gateway:
    return gateway_factory(RULES)


def test_record_query_live_export_and_replay(gw: Gateway, standin, tmp_path: Path,
                                             gateway_confdir: Path) -> None:
    standin.clear()
    client = sdk(gw.proxy_url(), gw.ca_cert, session="run-42")
    r1 = client.chat.completions.create(model="gpt-4o-mini",
                                        messages=[{"role": "user", "content": f"hi {EMAIL}"}])
    chunks = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[{"role": "user", "content": "stream me"}])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == "echo: stream me"
    # refused at CONNECT (default-deny egress): still a record
    with pytest.raises(openai.APIConnectionError):
        sdk(gw.proxy_url(), gw.ca_cert).with_options(
            base_url="https://evil.example.org/v1").models.list()
    # a body-named session (LangGraph thread id in request metadata), no header
    sdk(gw.proxy_url(), gw.ca_cert).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "from a thread"}],
        metadata={"thread_id": "lg-thread-7"})

    db = db_of(gw)
    deadline = time.monotonic() + 10
    while True:  # the writer batches every 20 ms; the CLI asks the running gateway
        q = cli("audit", "query", "--db", str(db), "--format", "json",
                "SELECT seq, session_id, outcome, status, method, url, upstream, model, "
                "request_headers, response_body_note, decode(response_body) AS resp, "
                "findings_total FROM flows ORDER BY seq")
        assert q.returncode == 0, q.stderr
        rows = [json.loads(line) for line in q.stdout.splitlines()]
        if len(rows) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(rows) == 4, rows
    by_session = {r["session_id"]: r for r in rows}
    run = [r for r in rows if r["session_id"] == "run-42"]
    assert [r["status"] for r in run] == [200, 200]
    assert run[0]["url"] == "https://api.openai.com/v1/chat/completions"
    assert run[0]["upstream"] == "openai" and run[0]["model"] == "gpt-4o-mini"
    assert r1.choices[0].message.content in run[0]["resp"]
    # the SSE body is recorded whole (store_streamed_bodies)
    assert "chat.completion.chunk" in run[1]["resp"] and "[DONE]" in run[1]["resp"]
    for r in run:
        hdrs = {k.lower(): v for k, v in json.loads(r["request_headers"])}
        assert hdrs["authorization"] == "[REDACTED]"
    refused = [r for r in rows if r["method"] == "CONNECT"]
    assert refused and refused[0]["outcome"] == "refused" and refused[0]["status"] == 403
    assert by_session["lg-thread-7"]["outcome"] == "forwarded"

    # sessions and verify work while the gateway holds the write lock
    s = cli("audit", "sessions", "--db", str(db), "--format", "json")
    assert s.returncode == 0, s.stderr
    sess = {json.loads(line)["session_id"]: json.loads(line) for line in s.stdout.splitlines()}
    assert sess["run-42"]["flows"] == 2
    v = cli("audit", "verify", "--db", str(db))
    assert v.returncode == 0 and "4 records verified" in v.stdout, v.stdout + v.stderr
    # only read-only statements
    bad = cli("audit", "query", "--db", str(db), "DELETE FROM flows")
    assert bad.returncode == 1 and "read-only" in bad.stderr
    bad = cli("audit", "query", "--db", str(db), "SELECT * FROM read_text('/etc/hostname')")
    assert bad.returncode == 1

    out = tmp_path / "run42.mitm"
    e = cli("export", "--db", str(db), "--session", "run-42", "-o", str(out))
    assert e.returncode == 0 and "wrote 2 flows" in e.stdout, e.stdout + e.stderr
    # the upstream's TLS certificate chain is stored once per distinct chain (certs_ref,
    # not inside each flow_state) and the export puts it back on every flow
    from mitmproxy import io as mio
    with open(out, "rb") as fh:
        exported = list(mio.FlowReader(fh).stream())
    assert len(exported) == 2
    assert all(f.server_conn.certificate_list for f in exported)
    c = cli("audit", "query", "--db", str(db), "--format", "json",
            "SELECT count(DISTINCT certs_ref) AS chains, count(*) FILTER (WHERE "
            "contains(decode(flow_state), 'BEGIN CERTIFICATE')) AS inline FROM flows "
            "WHERE session_id = 'run-42'")
    assert c.returncode == 0, c.stderr
    assert json.loads(c.stdout.splitlines()[0]) == {"chains": 1, "inline": 0}

    # mitmdump reads it
    rd = subprocess.run([str(BIN / "mitmdump"), "-nr", str(out), "--set",
                         f"confdir={gateway_confdir}"],
                        capture_output=True, text=True, timeout=60)
    assert rd.returncode == 0, rd.stderr
    assert "api.openai.com" in rd.stdout and "/v1/chat/completions" in rd.stdout

    # server replay: the same client completes offline with the recorded answers. Requests
    # were recorded as forwarded, i.e. masked; when the masker changed one, the agent's
    # raw request cannot match it byte for byte, so answers are matched by method, host
    # and path, in recorded order (server_replay_ignore_content).
    masked = any(r["findings_total"] for r in run)
    match = (["--set", "server_replay_ignore_content=true"] if masked else
             ["--set", "server_replay_extra=kill", "--set", "server_replay_reuse=true"])
    port = free_port()
    rp = subprocess.Popen([str(BIN / "mitmdump"), "--server-replay", str(out),
                           "--listen-host", "127.0.0.1", "--listen-port", str(port),
                           "--set", f"confdir={gateway_confdir}", *match,
                           "--set", "connection_strategy=lazy"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, rp)
        standin.clear()
        replay = sdk(f"http://127.0.0.1:{port}", gw.ca_cert, session="run-42")
        again = replay.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {EMAIL}"}])
        assert again.choices[0].message.content == r1.choices[0].message.content
        chunks = replay.chat.completions.create(
            model="gpt-4o-mini", stream=True,
            messages=[{"role": "user", "content": "stream me"}])
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
            == "echo: stream me"
        # not recorded: killed (exact matching), or no route offline (ordered matching)
        with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):
            replay.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "never said"}])
        assert standin.requests == []  # offline: nothing reached an upstream
    except BaseException:
        rp.terminate()
        print(rp.communicate(timeout=10)[0])
        raise
    finally:
        rp.terminate()
        rp.wait(10)

    # client replay re-sends the recorded requests through the gateway
    via = tmp_path / "via.mitm"
    e = cli("export", "--db", str(db), "--session", "run-42", "-o", str(via),
            "--via", f"http://127.0.0.1:{gw.port}")
    assert e.returncode == 0, e.stderr
    standin.clear()
    cr = subprocess.run([str(BIN / "mitmdump"), "-n", "-C", str(via),
                         "--mode", f"upstream:http://127.0.0.1:{gw.port}",
                         "--set", f"confdir={tmp_path / 'replayconf'}",
                         "--set", f"ssl_verify_upstream_trusted_ca={gw.ca_cert}"],
                        capture_output=True, text=True, timeout=60)
    assert cr.returncode == 0, cr.stdout + cr.stderr
    paths = [r["path"] for r in standin.requests]
    assert paths == ["/v1/chat/completions", "/v1/chat/completions"], cr.stdout
    for r in standin.requests:  # the gateway injected its key; the export carried none
        assert dict(r["headers"])["authorization"] == f"Bearer {GATEWAY_ENV['OPENAI_API_KEY']}"

    assert gw.stop() == 0
    con = duckdb.connect(str(db), read_only=True)
    n, findings = con.execute("SELECT count(*), sum(findings_total) FROM flows").fetchone()
    con.close()
    assert n == 6  # 4 + the 2 client-replayed requests
    assert_no_secrets(db, out, via)
    if findings:  # masking ran: the raw value it replaced must not be stored or exported
        assert_no_secrets(db, out, via, values=(EMAIL,))
    v = cli("audit", "verify", "--db", str(db))
    assert v.returncode == 0 and "6 records verified" in v.stdout, v.stdout + v.stderr


def _post(proxy_port: int, ca: Path, i: int) -> int | None:
    """Status of the answer (any status counts as an answer), None if none came."""
    import ssl
    ctx = ssl.create_default_context(cafile=str(ca))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": f"http://127.0.0.1:{proxy_port}"}),
        urllib.request.HTTPSHandler(context=ctx))
    body = json.dumps({"model": "m", "messages": [{"role": "user",
                                                   "content": f"load-{i:04d}"}]}).encode()
    req = urllib.request.Request("https://api.openai.com/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json",
                                          "X-Agent-Session": "load"})
    try:
        with opener.open(req, timeout=20) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None


def test_sigterm_under_load_keeps_every_answered_request(gw: Gateway) -> None:
    answered: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(200))
    started = threading.Event()

    def worker() -> None:
        for i in counter:
            status = _post(gw.port, gw.ca_cert, i)
            if status is not None:
                with lock:
                    answered[i] = status
                    if len(answered) >= 60:
                        started.set()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    assert started.wait(60)
    gw.proc.send_signal(signal.SIGTERM)  # mid-load
    for t in threads:
        t.join(60)
    assert gw.proc.wait(30) == 0
    assert len(answered) >= 60 and 200 in answered.values()
    con = duckdb.connect(str(db_of(gw)), read_only=True)
    got = con.execute("SELECT decode(request_body), status FROM flows "
                      "WHERE session_id = 'load'").fetchall()
    con.close()
    recorded = {int(b.split("load-")[1][:4]): st for b, st in got}
    missing = sorted(i for i in answered if recorded.get(i) != answered[i])
    assert not missing, f"{len(missing)} answered requests not recorded: {missing[:10]}"
    assert_no_secrets(db_of(gw))
    assert "audit store flushed and closed" in gw.logs()
    v = cli("audit", "verify", "--db", str(db_of(gw)))
    assert v.returncode == 0, v.stdout + v.stderr


def test_unwritable_store_refuses_flows(gateway_factory, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    gw = gateway_factory(rules(f"  path: {blocker}/sub/agentgate.duckdb\n"), wait=False)
    # At start-up an unopenable store stops the gateway (fail closed, with the reason);
    # a store that fails later makes it refuse new flows with 503 (tests/recording/test_addon.py).
    assert gw.proc.wait(30) != 0
    assert "cannot open the audit store" in gw.logs()


LANGGRAPH_AGENT = """
import sys
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph

thread = sys.argv[1]
llm = ChatOpenAI(model="gpt-4o-mini", api_key="agent-side-key", max_retries=0, timeout=30,
                 default_headers={"X-Agent-Session": thread})

def draft(state):
    return {"messages": [llm.invoke(state["messages"])]}

def refine(state):
    return {"messages": [llm.invoke(state["messages"] + [("user", "now shorter")])]}

g = StateGraph(MessagesState)
g.add_node("draft", draft)
g.add_node("refine", refine)
g.add_edge(START, "draft")
g.add_edge("draft", "refine")
g.add_edge("refine", END)
out = g.compile().invoke({"messages": [("user", "plan the offsite")]},
                         config={"configurable": {"thread_id": thread}})
print(" | ".join(m.content for m in out["messages"]))
"""


def test_langgraph_run_exported_and_replayed_offline(gw: Gateway, standin, tmp_path: Path,
                                                     gateway_confdir: Path) -> None:
    """The acceptance path: a LangGraph agent recorded, its session exported, and the same
    agent re-run against `mitmdump --server-replay` completes offline, same answers."""
    agent = [sys.executable, "-c", LANGGRAPH_AGENT, "offsite-1"]
    live = subprocess.run(agent, env=gw.client_env(), capture_output=True, text=True,
                          timeout=120)
    assert live.returncode == 0, live.stderr
    assert "echo: plan the offsite" in live.stdout and "echo: now shorter" in live.stdout
    out = tmp_path / "offsite.mitm"
    deadline = time.monotonic() + 10
    while True:  # recorded within a batch interval
        e = cli("export", "--db", str(db_of(gw)), "--session", "offsite-1", "-o", str(out))
        if "wrote 2 flows" in e.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "wrote 2 flows" in e.stdout, e.stdout + e.stderr
    port = free_port()
    rp = subprocess.Popen([str(BIN / "mitmdump"), "--server-replay", str(out),
                           "--listen-host", "127.0.0.1", "--listen-port", str(port),
                           "--set", f"confdir={gateway_confdir}",
                           "--set", "server_replay_extra=kill",
                           "--set", "connection_strategy=lazy"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, rp)
        standin.clear()
        env = gw.client_env()
        env.update(HTTPS_PROXY=f"http://127.0.0.1:{port}", HTTP_PROXY=f"http://127.0.0.1:{port}")
        offline = subprocess.run(agent, env=env, capture_output=True, text=True, timeout=120)
    finally:
        rp.terminate()
        rp.wait(10)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == live.stdout
    assert standin.requests == []
    assert gw.stop(signal.SIGINT) == 0  # Ctrl-C also flushes and closes the store
    assert "audit store flushed and closed (2 records this run" in gw.logs()
    assert_no_secrets(out, db_of(gw))


POLICIES = """policies:
  - name: no-blocked-model
    match: {model: "gpt-blocked"}
    action: block
    message: that model is not allowed
  - name: hold-bulk
    match: {model: "gpt-bulk"}
    action: approve
    approvers: [reviewers]
    timeout: 1
"""


def test_blocked_timed_out_and_refused_flows_are_records(gateway_factory) -> None:
    """Flows answered by the gateway itself (policy block, approval timeout, default-deny in
    requestheaders, CONNECT refusal) reach the store with their decision and rule."""
    gw = gateway_factory(rules() + POLICIES)
    client = sdk(gw.proxy_url(), gw.ca_cert, session="pol-1")
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-blocked",
                                       messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.APIStatusError):  # held, nobody approves, times out: denied
        client.chat.completions.create(model="gpt-bulk",
                                       messages=[{"role": "user", "content": "y"}])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(
        {"http": gw.proxy_url()}))
    req = urllib.request.Request("http://evil.example.org/x", data=b"{}",
                                 headers={"X-Agent-Session": "pol-1"})
    with pytest.raises(urllib.error.HTTPError) as ei:  # refused in requestheaders
        opener.open(req, timeout=20)
    assert ei.value.code == 403
    gw.stop()
    con = duckdb.connect(str(db_of(gw)), read_only=True)
    rows = con.execute("SELECT model, status, outcome, decision, rule, refusal_code, "
                       "approval_id, approval->>'state' FROM flows WHERE session_id = 'pol-1' "
                       "ORDER BY seq").fetchall()
    approvals = con.execute("SELECT id, rule, decision FROM approvals").fetchall()
    ok = store_verify(con)
    con.close()
    assert ok
    assert rows[0][:5] == ("gpt-blocked", 403, "refused", "block", "no-blocked-model")
    bulk = rows[1]
    assert bulk[:5] == ("gpt-bulk", 403, "refused", "approve", "hold-bulk")
    assert bulk[7] == "timeout" and bulk[5] == "approval_timeout"
    assert approvals == [(bulk[6], "hold-bulk", "timeout")]
    assert rows[2][1:3] == (403, "refused") and rows[2][5] == "destination_not_allowed"
    assert_no_secrets(db_of(gw))


def store_verify(con) -> bool:
    from addons.recording import store as audit_store
    return audit_store.verify(con).ok

"""Issue 16: the audit store's writer runs in its own process — and stays fail closed.

Through a real mitmdump and its real writer process (addons/recording/writerproc.py):
- the gateway process has no DuckDB loaded at all (its memory maps), the writer process has;
- the writer process killed (SIGKILL) mid-traffic: new flows get 503 `recorder_unavailable`
  in the caller's dialect until the gateway restarts it, then are served again; every flow
  the gateway answered is in the store and the chain verifies;
- the gateway killed with SIGKILL: the writer process notices its pipe closing, writes every
  record it was sent and exits (no orphan), and the store verifies;
- the gateway stopped with SIGTERM: the writer process drains and exits with it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from addons.recording import store
from addons.recording.writer import ask_gateway

pytestmark = pytest.mark.integration

RULES = ("{standin_upstreams}" + "identity:\n  required: false\n"
         + "approvals:\n  listen: \"off\"\n"
         + "recorder:\n  batch_interval_ms: 20\n")
URL = "https://api.openai.com/v1/chat/completions"


def _client(gw) -> httpx.Client:
    return httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60)


def _ask(c: httpx.Client, session: str) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    return c.post(URL, json=body, headers={"X-Agent-Session": session})


def _until(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _writer_pid(gw) -> int:
    found: list[int] = []

    def look() -> bool:
        found[:] = [p for p in _children(gw.proc.pid) if _is_writer(p)]
        return len(found) == 1
    assert _until(look, 20), f"writer processes of the gateway: {found}"
    return found[0]


def _is_writer(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"addons.recording.writerproc" in cmd and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _stored(db: Path) -> tuple[dict[str, list[Any]], store.VerifyResult]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT session_id, status, refusal_code FROM flows "
                           "ORDER BY seq").fetchall()
        by: dict[str, list[Any]] = {}
        for s, status, code in rows:
            by.setdefault(s, []).append((status, code))
        return by, store.verify(con)
    finally:
        con.close()


def test_duckdb_lives_in_the_writer_process_only(gateway_factory) -> None:
    gw = gateway_factory(RULES)
    with _client(gw) as c:
        for i in range(3):
            assert _ask(c, f"s{i}").status_code == 200
    writer = _writer_pid(gw)
    assert "duckdb" not in _maps(gw.proc.pid).lower()
    assert "duckdb" in _maps(writer).lower()

    def count() -> Any:  # the query socket is served by the writer process
        return ask_gateway(gw.data_dir / "agentgate.duckdb",
                           {"op": "query", "sql": "SELECT count(*) FROM flows"})
    assert _until(lambda: count() == {"columns": ["count_star()"], "rows": [[3]]}), count()


def test_a_killed_writer_refuses_then_recovers_and_loses_nothing(gateway_factory) -> None:
    gw = gateway_factory(RULES)
    answered: dict[str, int] = {}
    n = 0

    def ask(c: httpx.Client) -> httpx.Response:
        nonlocal n
        n += 1
        r = _ask(c, f"req-{n}")
        answered[f"req-{n}"] = r.status_code
        return r

    with _client(gw) as c:
        for _ in range(5):
            assert ask(c).status_code == 200
        first = _writer_pid(gw)
        os.kill(first, signal.SIGKILL)
        # fail closed while it is down, in the caller's dialect (OpenAI error JSON)
        refused: list[httpx.Response] = []

        def is_refused() -> bool:
            r = ask(c)
            if r.status_code == 503:
                refused.append(r)
            return bool(refused)
        assert _until(is_refused, 10), gw.logs()[-3000:]
        err = refused[0].json()["error"]
        assert err["code"] == "recorder_unavailable" and "writer process" in err["message"]
        # restarted by the gateway (bounded back-off): served again
        assert _until(lambda: ask(c).status_code == 200, 30), gw.logs()[-3000:]
        assert _writer_pid(gw) != first
        for _ in range(3):
            assert ask(c).status_code == 200
    assert gw.stop() == 0
    by, ok = _stored(gw.data_dir / "agentgate.duckdb")
    assert ok.ok, ok.problem
    # every answer the gateway gave is recorded, once
    assert set(by) == set(answered)
    for session, status in answered.items():
        assert [s for s, _ in by[session]] == [status]
    assert list(answered.values()).count(503) >= 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_writer_outlives_no_gateway(gateway_factory, sig: int) -> None:
    # a long batch interval: the records are still queued in the writer when the gateway
    # goes; they must be written anyway
    gw = gateway_factory(RULES.replace("batch_interval_ms: 20", "batch_interval_ms: 60000\n"
                                       "  batch_size: 100000"))
    with _client(gw) as c:
        for i in range(20):
            assert _ask(c, f"k{i}").status_code == 200
    writer = _writer_pid(gw)
    # The gateway's send thread pipes each record to the writer just after the flow is
    # answered; a SIGKILL inside that window (a few ms, longer on a loaded machine) loses the
    # record still in the gateway's memory, as the in-process queue did before. What this
    # test asserts is what happens to records already handed to the writer process.
    time.sleep(1.0)
    gw.proc.send_signal(sig)
    gw.proc.wait(30)
    assert _until(lambda: _gone(writer), 30), "the writer process outlived its gateway"
    by, ok = _stored(gw.data_dir / "agentgate.duckdb")
    assert ok.ok, ok.problem
    assert sorted(by) == sorted(f"k{i}" for i in range(20))

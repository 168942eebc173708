"""Recorder: sustained rows/s into DuckDB, and the latency recording adds to a request.

Two measurements, one run:

1. Writer throughput, in process (the writer process runs this `AuditWriter`): realistic
   flow snapshots (a ~2 KB chat request, a ~1 KB
   answer, real `flow.get_state()` from mitmproxy's test flows) submitted to the real
   `AuditWriter` as fast as one thread can, with the configured batch size; rows/s from the
   first submit until everything is committed (redaction, decoding, hashing, insert). The
   split between building rows and inserting them is measured separately. Then the
   recorder's CPU per flow in the gateway process: writer thread vs writer process.
2. Added latency, end to end: two identical real gateways (`mitmdump -s addons/gateway.py`,
   full suite, identity not required, masking off in both to isolate the recorder) in front
   of the stand-in, one with `recorder.enabled: false`. One keep-alive client connection to
   each; requests alternate between them (so outside load hits both alike); each request is
   timed from its first byte sent to its last byte read. Added latency = recording-on
   percentile minus recording-off percentile (p50, p99).

Run alone: `python -m bench.bench_recorder [--quick]`. `--writer-process [NAME=TREE ...]
[--rounds N]`: only the writer process's CPU per flow at a steady load (1 KB chat flows at
400/s, and bench_multiturn's 20 x 40 conversation), each tree (a checkout) interleaved.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench import harness as h

BODY = h.chat_body(2048)


def _states(n: int) -> list[dict[str, Any]]:
    from mitmproxy.test import tflow
    out = []
    answer = json.dumps({"id": "x", "model": "gpt-4o-mini", "choices": [
        {"message": {"role": "assistant", "content": "ok " * 300}}]}).encode()
    for i in range(n):
        f = tflow.tflow(resp=True)
        f.request.scheme, f.request.host, f.request.port = "https", "127.0.0.1", 9443
        f.request.path = "/v1/chat/completions"
        f.request.headers["content-type"] = "application/json"
        f.request.headers["authorization"] = "Bearer sk-bench-REAL-0000000000000000"
        f.request.content = BODY
        f.response.content = answer
        f.metadata.update({"upstream": {"name": "openai", "dialect": "openai"},
                           "session": f"s{i % 20}",
                           "recorder": {"origin": "https://api.openai.com/v1/chat/completions"}})
        out.append(f.get_state())
    return out


def writer_throughput(n: int, batch: int = 500) -> dict[str, Any]:
    from addons.recording import store
    from addons.recording.addon import build_row
    from addons.recording.writer import AuditWriter, open_db

    states = _states(min(n, 2000))
    secrets = ("sk-bench-REAL-0000000000000000",)

    def pending(i: int) -> store.Pending:
        st = dict(states[i % len(states)])
        st["id"] = f"flow-{i}"
        return store.Pending(state=st, session=f"s{i % 20}", secrets=secrets,
                             origin_url="https://api.openai.com/v1/chat/completions")

    with tempfile.TemporaryDirectory() as d:
        # build cost alone
        t0 = time.perf_counter()
        rows = [build_row(pending(i)) for i in range(min(n, 2000))]
        build_s = (time.perf_counter() - t0) / len(rows)
        # insert cost alone (pre-built rows, batches)
        con = open_db(Path(d) / "insert.duckdb")
        t0 = time.perf_counter()
        head = store.head(con)
        for k in range(0, len(rows), batch):
            head = store.append(con, rows[k:k + batch], head)
        insert_s = (time.perf_counter() - t0) / len(rows)
        con.close()
        # the real writer thread, sustained
        w = AuditWriter(Path(d) / "writer.duckdb", build=build_row, batch_size=batch,
                        interval=0.05, serve_queries=False)
        w.start()
        t0 = time.perf_counter()
        for i in range(n):
            w.submit(pending(i))
        submit_s = time.perf_counter() - t0
        assert w.flush(600), "writer did not drain"
        total = time.perf_counter() - t0
        w.close()
        con = open_db(Path(d) / "writer.duckdb", read_only=True)
        ok = store.verify(con).ok
        size = (Path(d) / "writer.duckdb").stat().st_size
        con.close()
    return {"rows": n, "batch": batch, "rows_per_s": round(n / total),
            "build_us_per_row": round(build_s * 1e6, 1),
            "insert_us_per_row": round(insert_s * 1e6, 1),
            "submit_us_per_row": round(submit_s / n * 1e6, 2),
            "bytes_per_row": round(size / n), "chain_verified": ok}


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_cpu(n: int, rounds: int = 2) -> dict[str, Any]:
    """CPU per flow that recording costs the gateway process, by where the writer runs.

    The same flow snapshots (what the hook hands over: `store.Pending` of a real flow state)
    are recorded to a fresh store by the writer as a thread of this process (the design before
    issue 16's PERF-G) and by the writer process (`remote.WriterProcess`, now), alternating,
    `rounds` times each; CPU from the first submit until everything is committed. "gateway"
    is this process's CPU (every thread: the event loop's submit and, with the thread, the
    build + insert; with the process, serialising + the pipe's sender/ack threads); "writer
    process" is the child's. Best round of each (least disturbed by neighbours)."""
    from addons.recording import store
    from addons.recording.addon import build_row
    from addons.recording.remote import WriterProcess
    from addons.recording.writer import AuditWriter

    states = _states(min(n, 2000))
    secrets = ("sk-bench-REAL-0000000000000000",)

    def pendings() -> list[store.Pending]:
        out = []
        for i in range(n):
            st = dict(states[i % len(states)])
            st["id"] = f"flow-{i}"
            out.append(store.Pending(state=st, session=f"s{i % 20}", secrets=secrets,
                                     origin_url="https://api.openai.com/v1/chat/completions",
                                     size=3000))
        return out

    best: dict[str, list[float]] = {"thread": [], "process": [], "process_writer": [],
                                    "process_submit": [], "thread_submit": []}
    for r in range(rounds):
        for mode in ("thread", "process"):
            items = pendings()
            with tempfile.TemporaryDirectory() as d:
                db = Path(d) / f"{mode}{r}.duckdb"
                if mode == "thread":
                    w: Any = AuditWriter(db, build=build_row, batch_size=500, interval=0.05,
                                         serve_queries=False)
                else:
                    w = WriterProcess(db, batch_size=500, interval=0.05, serve_queries=False)
                w.start()
                child0 = _proc_cpu(w.pid) if mode == "process" else 0.0
                t0 = time.process_time()
                for p in items:
                    w.submit(p)
                t_sub = time.process_time() - t0
                assert w.flush(600), "writer did not drain"
                cpu = time.process_time() - t0
                if mode == "process":
                    best["process_writer"].append((_proc_cpu(w.pid) - child0) / n)
                w.close()
            best[mode].append(cpu / n)
            best[f"{mode}_submit"].append(t_sub / n)
    us = {k: round(min(v) * 1e6, 1) for k, v in best.items()}
    return {"flows": n, "rounds": rounds,
            "thread_gateway_us": us["thread"], "thread_submit_us": us["thread_submit"],
            "process_gateway_us": us["process"], "process_submit_us": us["process_submit"],
            "process_writer_us": us["process_writer"]}


def _threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of a process (/proc/<pid>/task)."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            f = Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()
            out[t] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _multiturn_pendings(agents: int, turns: int) -> list[list[Any]]:
    """bench_multiturn's conversations as the recorder hands them over: one round of
    `agents` flows per turn (request = the whole history so far, a ~1.8 KB answer)."""
    from mitmproxy.test import tflow

    from addons.recording import store
    from bench.bench_multiturn import conversation
    convs = [conversation(a, turns) for a in range(agents)]
    answer = json.dumps({"id": "x", "model": "gpt-4o-mini", "choices": [
        {"message": {"role": "assistant", "content": "ok " * 600}}]}).encode()
    rounds = []
    for t in range(turns):
        one = []
        for a in range(agents):
            f = tflow.tflow(resp=True)
            f.request.scheme, f.request.host, f.request.port = "https", "127.0.0.1", 9443
            f.request.path = "/v1/chat/completions"
            f.request.headers["content-type"] = "application/json"
            f.request.content = convs[a][t]
            f.response.content = answer
            f.metadata.update({"upstream": {"name": "openai", "dialect": "openai"},
                               "identity": {"sub": f"agent-{a}", "iss": "https://idp"},
                               "session": f"agent-{a}"})
            one.append(store.Pending(state=f.get_state(), session=f"agent-{a}",
                                     origin_url="https://api.openai.com/v1/chat/completions",
                                     secrets=("sk-bench-REAL-0000000000000000",),
                                     size=len(convs[a][t])))
        rounds.append(one)
    return rounds


def writer_process_cpu(flows: int = 3000, rate: int = 400, agents: int = 20,
                       turns: int = 40) -> dict[str, Any]:
    """The writer process's CPU per flow at a steady load, as a gateway feeds it: the real
    `remote.WriterProcess` (default batching: 500 rows / 200 ms), records submitted in
    ticks of 20 ms (1 KB chat flows at `rate`/s; bench/e2e.py's 100 KB body, half as
    many flows at 200/s), or one round of `agents` multi-turn
    flows every 150 ms (bench_multiturn's conversations, lock-step by turn). CPU is the
    writer process's (/proc, every thread) from the first submit until all is committed;
    per thread too (the main thread reads the pipe, the writer thread builds and inserts).
    Its RSS at rest and at the end."""
    from addons.recording import store
    from addons.recording.remote import WriterProcess

    states = _states(200)
    one_kb = [store.Pending(state=dict(states[i % len(states)], id=f"flow-{i}"),
                            session=f"s{i % 16}", secrets=("sk-bench-REAL-0000000000000000",),
                            origin_url="https://api.openai.com/v1/chat/completions",
                            size=3000) for i in range(flows)]
    tick = max(1, rate // 50)
    # bench/e2e.py's 100 KB chat body (the same on every request, as there) at ~200/s,
    # 16 connections: the load under which the writer's peak memory was highest
    big = h.chat_body(100 * 1024)
    hundred = []
    for i in range(flows // 2):
        st = dict(states[i % len(states)], id=f"big-{i}")
        st["request"] = dict(st["request"], content=big)
        hundred.append(store.Pending(state=st, session=f"c{i % 16}",
                                     secrets=("sk-bench-REAL-0000000000000000",),
                                     origin_url="https://api.openai.com/v1/chat/completions",
                                     size=len(big)))
    loads = {"1kb": ([one_kb[i:i + tick] for i in range(0, flows, tick)], 0.02),
             "100kb": ([hundred[i:i + 4] for i in range(0, len(hundred), 4)], 0.02),
             "multiturn": (_multiturn_pendings(agents, turns), 0.15)}
    out: dict[str, Any] = {}
    for name, (groups, gap) in loads.items():
        with tempfile.TemporaryDirectory() as d:
            w = WriterProcess(Path(d) / "a.duckdb")
            w.start()
            assert w.pid is not None
            rest = h.proc_status(w.pid)
            cpu0, th0 = _proc_cpu(w.pid), _threads_cpu(w.pid)
            # the gateway's side: this process (submit on this thread, as on the event
            # loop, plus the sender and acknowledgement threads)
            own0, sub0 = time.process_time(), time.thread_time()
            n, t0 = 0, time.monotonic()
            for k, group in enumerate(groups):
                for p in group:
                    w.submit(p)
                    n += 1
                time.sleep(max(0.0, t0 + (k + 1) * gap - time.monotonic()))
            assert w.flush(600), "writer did not drain"
            cpu1, th1 = _proc_cpu(w.pid), _threads_cpu(w.pid)
            own1, sub1 = time.process_time(), time.thread_time()
            end = h.proc_status(w.pid)
            w.close()
        out[name] = {"flows": n, "writer_us_per_flow": round((cpu1 - cpu0) / n * 1e6, 1),
                     "gateway_side_us_per_flow": round((own1 - own0) / n * 1e6, 1),
                     "submit_thread_us_per_flow": round((sub1 - sub0) / n * 1e6, 1),
                     "threads_us_per_flow": sorted(
                         (round((v - th0.get(t, 0.0)) / n * 1e6, 1) for t, v in th1.items()),
                         reverse=True),
                     "rss_rest_kib": rest.get("VmRSS"), "rss_end_kib": end.get("VmRSS"),
                     "rss_peak_kib": end.get("VmHWM")}
    return out


def _rules(standin_url: str, enabled: bool) -> str:
    return textwrap.dedent(f"""\
        upstreams:
          - name: openai
            hosts: [api.openai.com]
            scheme: http  # the bench speaks plain HTTP to the proxy (declared: issue 11)
            dialect: openai
            forward_to: {standin_url}
            credential: {{header: Authorization, prefix: "Bearer ", env: OPENAI_API_KEY}}
        identity:
          required: false
        masking:
          enabled: false
        approvals:
          listen: "off"
        recorder:
          enabled: {"true" if enabled else "false"}
        """)


def added_latency(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        certs = work / "certs"
        ca, _leaf, _key = h.upstream_certs(certs)
        standin = h.start_standin(work, certs)
        confdir = h.make_confdir(work / "conf")
        gws = []
        try:
            for name, enabled in (("rec_on", True), ("rec_off", False)):
                rules = work / f"rules_{name}"
                rules.mkdir()
                (rules / "rules.yaml").write_text(_rules(standin.url, enabled))
                data = work / f"data_{name}"
                data.mkdir()
                gws.append(h.start_mitmdump(
                    name, work, confdir, ca, scripts=[str(h.ROOT / "addons/gateway.py")],
                    sets=[f"agentgate_rules={rules}", f"agentgate_data={data}"],
                    env={"OPENAI_API_KEY": "sk-bench-REAL-0000000000000000"}))
            lat = _alternate([g.port for g in gws], n)
            rss = {"gateway, recording on": h.proc_status(gws[0].pid).get("VmHWM"),
                   "its writer process": sum(h.proc_status(c).get("VmHWM") or 0
                                             for c in _writer_children(gws[0].pid)),
                   "gateway, recording off": h.proc_status(gws[1].pid).get("VmHWM")}
            rows = _count_rows(gws[0], work / "data_rec_on" / "agentgate.duckdb")
        finally:
            for g in gws:
                g.stop()
            standin.stop()
    on, off = sorted(lat[0]), sorted(lat[1])
    res = {"requests_each": n}
    for q in (50, 99):
        a, b = h.percentile(on, q) * 1000, h.percentile(off, q) * 1000
        res[f"p{q}_on_ms"] = round(a, 3)
        res[f"p{q}_off_ms"] = round(b, 3)
        res[f"p{q}_added_ms"] = round(a - b, 3)
    res["rows_recorded"] = rows
    res["rss_peak_kib"] = rss
    return res


def _writer_children(pid: int) -> list[int]:
    """The gateway's audit writer process(es) (addons/recording/writerproc.py)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for c in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if b"addons.recording.writerproc" in Path(f"/proc/{c}/cmdline").read_bytes():
                    out.append(int(c))
    return out


def _count_rows(gw: h.Proc, db: Path) -> int:
    gw.stop()  # flushes; then the file can be opened
    import duckdb
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM flows").fetchone()[0]
    finally:
        con.close()


def _alternate(ports: list[int], n: int) -> tuple[list[float], list[float]]:
    import socket
    conns = [socket.create_connection(("127.0.0.1", p)) for p in ports]
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    files = [c.makefile("rb") for c in conns]
    body = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "summarise the ticket " * 40}]}).encode()
    req = (b"POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\n"
           b"Host: api.openai.com\r\nContent-Type: application/json\r\n"
           b"X-Agent-Session: bench\r\n"
           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    lat: tuple[list[float], list[float]] = ([], [])
    warm = 20
    for i in range(n + warm):
        for j in ((0, 1) if i % 2 else (1, 0)):
            t0 = time.perf_counter()
            conns[j].sendall(req)
            status = _read_response(files[j])
            secs = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"gateway answered {status}")
            if i >= warm:
                lat[j].append(secs)
    for c in conns:
        c.close()
    return lat


def _read_response(f: Any) -> int:
    line = f.readline()
    status = int(line.split()[1])
    length = 0
    chunked = False
    while True:
        hl = f.readline()
        if hl in (b"\r\n", b"\n", b""):
            break
        k, _, v = hl.decode("latin-1").partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
        if k.strip().lower() == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    if chunked:
        while True:
            size = int(f.readline().split(b";")[0], 16)
            f.read(size + 2)
            if size == 0:
                break
    else:
        f.read(length)
    return status


def run(quick: bool = False) -> dict:
    res: dict[str, Any] = {"machine": h.machine_facts(),
                           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    res["writer"] = writer_throughput(3000 if quick else 20000)
    res["gateway_cpu"] = gateway_cpu(3000 if quick else 10000)
    res["latency"] = added_latency(150 if quick else 1000)
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return res


def markdown(results: dict) -> str:
    w, lt, g = results["writer"], results["latency"], results["gateway_cpu"]
    return textwrap.dedent(f"""\
        ### Recorder (DuckDB audit store)

        Writer thread, sustained: **{w['rows_per_s']:,} rows/s** ({w['rows']:,} realistic
        flows, ~2 KB request + ~1 KB answer, batches of {w['batch']}; build
        {w['build_us_per_row']} µs/row — redaction, decoding, flow state, sha256 chain —
        insert {w['insert_us_per_row']} µs/row; the hook itself only snapshots and queues:
        {w['submit_us_per_row']} µs/row on the event loop; {w['bytes_per_row']:,} bytes/row
        on disk; chain verified: {w['chain_verified']}).

        Recording's CPU per flow in the gateway process ({g['flows']:,} flows, best of
        {g['rounds']} alternating rounds): writer as a thread of the gateway (before)
        **{g['thread_gateway_us']} µs** (hook {g['thread_submit_us']} µs); writer in its own
        process (now) **{g['process_gateway_us']} µs** (hook, serialising the snapshot:
        {g['process_submit_us']} µs) in the gateway + {g['process_writer_us']} µs in the
        writer process.

        Added latency (same run, two identical gateways, recording on vs
        `recorder.enabled: false`, {lt['requests_each']} alternating requests each, one
        keep-alive connection per gateway):

        | | recording off | recording on | added |
        |---|---|---|---|
        | p50 | {lt['p50_off_ms']} ms | {lt['p50_on_ms']} ms | {lt['p50_added_ms']} ms |
        | p99 | {lt['p99_off_ms']} ms | {lt['p99_on_ms']} ms | {lt['p99_added_ms']} ms |

        Peak RSS (VmHWM, KiB): {lt.get('rss_peak_kib')}.

        Rows recorded by the gateway during the run: {lt['rows_recorded']:,}. Load average
        (1/5/15 min) before {results.get('loadavg_before')}, after
        {results.get('loadavg_after')}: on a shared machine p99 mostly measures the neighbours;
        the writer process competes with the gateway for a core, not for its GIL.
        """)


def compare_writer(trees: dict[str, str], rounds: int = 2) -> dict[str, list[Any]]:
    """writer_process_cpu (this file's) for each tree (a checkout: PYTHONPATH and cwd on
    it, so the gateway side and the writer process run its code), interleaved `rounds`
    times."""
    import subprocess
    out: dict[str, list[Any]] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
            got = subprocess.run(
                [sys.executable, "-c", "import json, runpy, sys; f = runpy.run_path("
                 "sys.argv[1])['writer_process_cpu']; print(json.dumps(f()))", __file__],
                cwd=tree, env=env, capture_output=True, text=True, timeout=900, check=True)
            out[name].append(json.loads(got.stdout.strip().splitlines()[-1]))
    return out


if __name__ == "__main__":
    if "--writer-process" in sys.argv:
        # python -m bench.bench_recorder --writer-process [NAME=TREE ...] [--rounds N]
        args = [a for a in sys.argv[1:] if "=" in a]
        rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 2
        res = compare_writer(dict(a.split("=", 1) for a in args) or {"this": "."}, rounds)
        print(json.dumps(res, indent=1))
        sys.exit(0)
    r = run(quick="--quick" in sys.argv)
    print(json.dumps(r, indent=1, default=str))
    print(markdown(r))

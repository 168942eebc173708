"""Multi-turn agent conversations through bare mitmdump and the full suite, in one run.

The workload of issue 16: N agents (default 20) each hold a conversation of M turns
(default 40); every request re-sends the whole history, as chat APIs require, so a body
grows from ~1.6 KB at turn 1 to ~120 KB at turn 40. Each turn adds a user message (~1 KB)
and the assistant's previous answer (~2 KB), prose with a realistic PII density (an
e-mail, a phone number, a card or an IP address every ~1.1 KB; no US SSN, which the
suite's policy blocks). Agents run concurrently, in lock-step by turn (all agents send
turn k, then turn k+1), each on its own keep-alive connection with its own session
(`X-Agent-Session`), so the proxy's CPU time over one round is the cost of turn k.

Measured per configuration (bare mitmdump, then the suite: identity, policy, masking,
recording, as bench/e2e.py runs it), against the same nginx upstream:
- CPU per turn (proxy process utime+stime over a round / N), by decile of turns; the
  ratio late/early (turns 31-40 over 1-10, scaled to M);
- total CPU over the run, suite/bare;
- p50 / p90 latency of a request (client wall clock), all turns;
- peak RSS (VmHWM) of the proxy process;
- audit bytes per session (the suite's data directory after it stopped, over N) against
  the bytes of distinct content an agent sent (its last body, which holds every message
  once).

Run alone: `python -m bench.bench_multiturn [--quick] [--agents N] [--turns M]`.
`--in-process`: no proxy; the CPU per turn of what the gateway does with each body in
policy's and masking's request path (the flow's one decode and JSON parse, policy's
facts and decision under the suite's rules with the session's history, then the
masking of the body with the session's message cache), in this process, so that what
still grows with the history there is measured without the proxy's noise; with
`--profile F` a cProfile of the last quarter of the turns is written to F.
"""

from __future__ import annotations

import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import e2e
from bench import harness as h

TARGETS = {"late_over_early": 1.5, "suite_over_bare_cpu": 2.0, "audit_over_distinct": 2.0}

_WORDS = ("the customer asked whether the order could be shipped before friday and if the "
          "invoice address on file is still correct after the move to the new office; "
          "please check the ticket history, summarise what was promised last week, and "
          "draft a short answer that keeps the tone friendly but does not commit to a date "
          "we cannot keep; the warehouse team said the backlog should clear by monday").split()
_FIRST = ("anna", "ben", "carla", "dmitri", "elif", "farid", "greta", "hugo", "ines", "jon")
_LAST = ("meyer", "okafor", "silva", "tanaka", "novak", "berg", "costa", "haddad")
_CARDS = ("4111 1111 1111 1111", "5500 0000 0000 0004", "4012 8888 8888 1881",
          "3782 822463 10005")


def _pii(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}{rng.randrange(100)}@example.com"
    if kind == 1:
        return f"+1 415 555 {rng.randrange(1000, 9999)}"
    if kind == 2:
        return rng.choice(_CARDS)
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def prose(rng: random.Random, size: int, pii_every: int = 1100) -> str:
    """~`size` characters of prose with one PII value every ~`pii_every` characters."""
    out: list[str] = []
    n = 0
    next_pii = rng.randrange(pii_every // 2, pii_every)
    while n < size:
        if n >= next_pii:
            w = _pii(rng)
            next_pii += pii_every
        else:
            w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out) + "."


def conversation(agent: int, turns: int, seed: int = 16) -> list[bytes]:
    """The request bodies of one agent's conversation, turn 1..turns (deterministic)."""
    rng = random.Random(seed * 1000 + agent)
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You are a careful support agent for Example Corp. "
                                      "Answer briefly; never invent order numbers."}]
    bodies = []
    for t in range(turns):
        if t:
            messages.append({"role": "assistant", "content": prose(rng, 2000)})
        messages.append({"role": "user", "content": prose(rng, 1000 if t else 1300)})
        bodies.append(json.dumps({"model": "gpt-4o-mini", "messages": messages,
                                  "temperature": 0.2}).encode())
    return bodies


def _round(conns: list[Any], paths: list[str], bodies: list[bytes], sessions: list[str]
           ) -> tuple[list[float], list[str]]:
    lat: list[float] = [0.0] * len(conns)
    errs: list[str] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            status, hdrs, data = conns[i].request(paths[i], bodies[i],
                                                  [f"X-Agent-Session: {sessions[i]}"])
        except (OSError, ConnectionError, ValueError) as e:
            errs.append(f"{type(e).__name__}: {e}")
            return
        lat[i] = (time.perf_counter() - t0) * 1000
        if status != 200:
            errs.append(f"status {status} {hdrs.get('x-agentgate-refused', '')} {data[:200]!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errs


def drive(url: str, proxy: str, pid: int, convs: list[list[bytes]], tag: str
          ) -> dict[str, Any]:
    """Every agent's conversation through one proxy, turn by turn; CPU per turn."""
    n = len(convs)
    turns = len(convs[0])
    opened = [h._open(url, proxy, None) for _ in range(n)]
    conns = [c for c, _ in opened]
    paths = [p for _, p in opened]
    sessions = [f"{tag}-agent-{i}" for i in range(n)]
    cpu_turn: list[float] = []
    own_turn: list[float] = []
    lats: list[float] = []
    errors: list[str] = []
    # the proxy and its child processes (the suite's audit writer): work moved out of the
    # gateway process still counts; the gateway process alone is reported beside
    cpu_start, own_start = h.tree_cpu_seconds(pid), h.cpu_seconds(pid)
    try:
        for t in range(turns):
            c0, o0 = h.tree_cpu_seconds(pid), h.cpu_seconds(pid)
            lat, errs = _round(conns, paths, [c[t] for c in convs], sessions)
            # the proxy may still be finishing (recording) after the last reply
            time.sleep(0.02)
            cpu_turn.append((h.tree_cpu_seconds(pid) - c0) * 1000 / n)
            own_turn.append((h.cpu_seconds(pid) - o0) * 1000 / n)
            lats += [x for x in lat if x]
            errors += errs
            if len(errors) > 5:
                break
    finally:
        for c in conns:
            c.close()
    time.sleep(0.5)
    total = h.tree_cpu_seconds(pid) - cpu_start
    own_total = h.cpu_seconds(pid) - own_start
    lats.sort()
    return {"cpu_ms_per_turn": [round(x, 2) for x in cpu_turn],
            # the gateway process alone (what grows on the gateway's side of the pipe)
            "own_cpu_ms_per_turn": [round(x, 2) for x in own_turn],
            "cpu_total_s": round(total, 3),
            "own_cpu_total_s": round(own_total, 3),
            "p50_ms": round(h.percentile(lats, 50), 2) if lats else None,
            "p90_ms": round(h.percentile(lats, 90), 2) if lats else None,
            # with child processes: the sum of each one's peak (an upper bound)
            "peak_rss_mib": round((h.tree_kib(pid, "VmHWM") or 0) / 1024, 1),
            "own_peak_rss_mib": round(h.proc_status(pid).get("VmHWM", 0) / 1024, 1),
            "errors": errors[:5]}


def deciles(per_turn: list[float]) -> list[float]:
    """Mean CPU per turn in ten equal slices of the turns (fewer when turns < 10)."""
    k = min(10, len(per_turn))
    out = []
    for d in range(k):
        lo, hi = d * len(per_turn) // k, (d + 1) * len(per_turn) // k
        out.append(round(statistics.fmean(per_turn[lo:hi]), 2))
    return out


def late_over_early(per_turn: list[float]) -> float | None:
    """Mean of the last quarter of turns over the first quarter (31-40 over 1-10)."""
    q = max(1, len(per_turn) // 4)
    early = statistics.fmean(per_turn[:q])
    late = statistics.fmean(per_turn[-q:])
    return round(late / early, 2) if early > 0 else None


def _suite_policies() -> Any:
    """The suite's policy set (bench/e2e.py's rules), parsed as the gateway parses it."""
    import yaml

    from addons.config.schema import Where
    from addons.egress.config import Upstream
    from addons.policy.config import parse_policies
    hosts = ("127.0.0.1:1", "127.0.0.1:2")
    files = e2e.suite_rules(*hosts, None, ("policy",))
    items = yaml.safe_load(files["40-policies.yaml"])["policies"]
    ups = tuple(Upstream(n, (hp,), "openai", None)
                for n, hp in zip(("bench-openai", "bench-stream"), hosts, strict=True))
    return parse_policies([(it, Where("40-policies.yaml", f"policies[{i}]"))
                           for i, it in enumerate(items)], ups)


def in_process(agents: int = 6, turns: int = 40, profile: str | None = None
               ) -> dict[str, Any]:
    """CPU per turn of decode + policy (the suite's rules, a session history per agent,
    as the policy addon evaluates) and of masking (addons.masking.addon.mask_message
    with the real detectors, per-session placeholders and message caches), no proxy."""
    import cProfile

    from mitmproxy.test import tflow

    from addons.frame import decode
    from addons.masking.addon import mask_message
    from addons.masking.bodies import Masked, MessageCaches
    from addons.masking.config import MaskingConfig
    from addons.masking.detectors import DetectorSet
    from addons.masking.masker import Masker, SessionStore, session_key
    from addons.policy.addon import facts_from_flow
    from addons.policy.engine import SearchHistories, evaluate

    convs = [conversation(i, turns) for i in range(agents)]
    store = SessionStore()
    masker = Masker(DetectorSet(MaskingConfig()), b"bench-key", store)
    caches = MessageCaches()
    limit = MaskingConfig().max_body_bytes
    prof = cProfile.Profile() if profile else None
    per_turn: list[float] = []
    policy_turn: list[float] = []
    policies = _suite_policies()
    histories = SearchHistories()
    for t in range(turns):
        flows = []
        for a in range(agents):
            f = tflow.tflow()
            f.request.headers["content-type"] = "application/json"
            f.request.raw_content = convs[a][t]
            f.request.host, f.request.path = "127.0.0.1", "/v1/chat/completions"
            f.metadata["upstream"] = {"name": "bench-openai", "dialect": "openai"}
            flows.append(f)
        late = prof is not None and t >= turns - max(1, turns // 4)
        if late:
            prof.enable()
        c0 = time.process_time()
        p0 = 0.0
        for a, f in enumerate(flows):
            raw = f.request.raw_content
            key = session_key("bench", f"agent-{a}")
            # policy: the one parse, with the session's memo key, and the decision
            p1 = time.process_time()
            facts = facts_from_flow(f, max_bytes=limit, memo_key=key)
            facts.history = histories.get(key)
            assert evaluate(policies, facts).action == "allow"
            p0 += time.process_time() - p1
            body = decode.request_body(f, max_bytes=limit, memo_key=key)
            assert body is not None and body.json is not None
            sess = store.get(key)
            ctx = Masked(masker, sess, {}, restorable=True, dialect="openai",
                         cache=caches.get(key, sess, masker))
            mask_message(ctx, raw, "", "application/json", limit, False, flow=f,
                         memo_key=key)
        per_turn.append((time.process_time() - c0) * 1000 / agents)
        policy_turn.append(p0 * 1000 / agents)
        if late:
            prof.disable()
    if prof is not None and profile:
        prof.dump_stats(profile)
    return {"agents": agents, "turns": turns,
            "cpu_ms_per_turn": [round(x, 3) for x in per_turn],
            "deciles": deciles(per_turn), "late_over_early": late_over_early(per_turn),
            "cpu_total_ms": round(sum(per_turn) * agents, 1),
            "policy_deciles": deciles(policy_turn),
            "policy_late_over_early": late_over_early(policy_turn)}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _held_bytes(db: Path) -> int | None:
    """The bytes of the values the audit store holds (every text and blob value of its
    tables, before DuckDB compresses them): a second, steadier measure beside the data
    directory's growth, which moves in DuckDB's blocks (64 KiB in a store made now)."""
    import duckdb
    if not db.exists():
        return None
    con = duckdb.connect(str(db), read_only=True)
    try:
        total = 0
        for table, column in con.execute(
                "SELECT c.table_name, c.column_name FROM information_schema.columns c "
                "JOIN information_schema.tables t USING (table_name) WHERE t.table_type = "
                "'BASE TABLE' AND c.data_type IN ('VARCHAR', 'BLOB', 'JSON', 'VARCHAR[]')"
                ).fetchall():  # (not the flow_bodies view: it reassembles every body)
            expr = (f"octet_length(CAST(array_to_string({column}, ',') AS BLOB))"
                    if column == "identity_groups" else
                    f"octet_length(CAST({column} AS BLOB))")
            total += con.execute(f"SELECT coalesce(sum({expr}), 0) "  # noqa: S608
                                 f"FROM {table}").fetchone()[0]
        return int(total)
    finally:
        con.close()


def run(quick: bool = False, agents: int | None = None, turns: int | None = None,
        profile: str | None = None, concerns: tuple[str, ...] = e2e.CONCERNS,
        base: str | None = None, repeats: int = 1, profile_rate: int = 200
        ) -> dict[str, Any]:
    """`profile`: a path for a py-spy profile (collapsed stacks) of the suite's run, at
    `profile_rate` samples per second (the GIL holder's stacks: the gateway's Python work);
    `concerns`: the suite's concerns (default all, as bench/e2e.py); `base`: another
    checkout (a git worktree at the commit before a change) whose gateway runs the same
    conversations, interleaved with this tree's `repeats` times (base, suite, base, …):
    before/after in one invocation, under the same machine load."""
    n = agents or (4 if quick else 20)
    m = turns or (12 if quick else 40)
    convs = [conversation(i, m) for i in range(n)]
    out: dict[str, Any] = {"agents": n, "turns": m,
                           "body_bytes_first": len(convs[0][0]),
                           "body_bytes_last": len(convs[0][-1])}
    tmp = Path(tempfile.mkdtemp(prefix="agentgate-multiturn-"))
    env = e2e._Env(tmp, {}, 0)
    out["notes"] = env.notes
    try:
        certs = tmp / "upstream-certs"
        env.upstream_ca, _, _ = h.upstream_certs(certs)
        standin = env.spawn(h.start_standin(tmp, certs))
        try:
            upstream = env.spawn(h.start_nginx(tmp, certs))
        except (RuntimeError, OSError) as e:
            upstream = standin
            env.notes.append(f"nginx unavailable ({e}); the stand-in answers")
        env.up_hostport = upstream.url.removeprefix("https://")
        env.st_hostport = standin.url.removeprefix("https://")
        env.confdir = h.make_confdir(tmp / "mitm-conf")
        env.bodies = {"1KB": tmp / "body-1k.json"}
        env.bodies["1KB"].write_bytes(h.chat_body(1024))
        env.url = url = upstream.url + "/v1/chat/completions"
        bare = env.spawn(h.start_mitmdump("bare", tmp, env.confdir, env.upstream_ca))
        # warm-up (certificates, code paths) with a different conversation
        warm = [conversation(1000 + i, 2) for i in range(2)]
        drive(url, bare.url, bare.pid, warm, "warm")
        out["bare"] = drive(url, bare.url, bare.pid, convs, "bare")
        bare.stop()
        if base:
            for r in range(repeats):
                for label, tree in (("base", Path(base)), ("suite", None)):
                    key = label if r == 0 else f"{label}_{r + 1}"
                    if tree is None:
                        s2, p2, active, err = env.start_suite(tuple(concerns), key)
                    else:
                        s2, p2, active, err = env.start_suite(tuple(concerns), key,
                                                              tree=tree)
                    if err:
                        out["error"] = f"{key} could not serve a request: " \
                                       f"{err.splitlines()[0]}"
                        break
                    out["active_concerns"] = active
                    drive(url, p2, s2.pid, warm, "warm")
                    out[key] = drive(url, p2, s2.pid, convs, key)
                    s2.stop()
        if base:
            pass
        elif (started := env.start_suite(tuple(concerns), "suite"))[3]:
            suite, proxy, active, err = started
            out["active_concerns"] = active
            out["error"] = f"suite could not serve a request: {err.splitlines()[0]}"
            return out
        else:
            suite, proxy, active, _ = started
            out["active_concerns"] = active
            _suite_run(out, env, url, proxy, suite, warm, convs, profile, n, profile_rate)
    finally:
        env.stop()
    return _summarise(out)


def _suite_run(out: dict[str, Any], env: Any, url: str, proxy: str, suite: Any,
               warm: list[list[bytes]], convs: list[list[bytes]], profile: str | None,
               n: int, profile_rate: int = 200) -> None:
    """The suite's run (this tree): CPU per turn, with a py-spy profile if asked, and the
    audit bytes its data directory gained."""
    drive(url, proxy, suite.pid, warm, "warm")
    data = env.tmp / f"data{env.n_suites}"
    before = _dir_bytes(data)
    spy = None
    if profile and e2e.py_spy():
        spy = subprocess.Popen([e2e.py_spy(), "record", "--gil", "--format", "raw",
                                "-r", str(profile_rate), "-o", profile, "-p", str(suite.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    try:
        out["suite"] = drive(url, proxy, suite.pid, convs, "suite")
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
    suite.stop()
    if "recording" in out["active_concerns"]:
        out["audit_bytes_per_session"] = round((_dir_bytes(data) - before) / n)
        held = _held_bytes(data / "agentgate.duckdb")
        if held is not None:  # (the warm-up's few rows included)
            out["audit_held_bytes_per_session"] = round(held / n)
        out["distinct_bytes_per_session"] = round(
            statistics.fmean(len(c[-1]) for c in convs))


def _summarise(out: dict[str, Any]) -> dict[str, Any]:
    for k in [k for k in out if k == "bare" or k.startswith(("suite", "base"))]:
        r = out.get(k)
        if isinstance(r, dict) and "cpu_ms_per_turn" in r:
            r["deciles"] = deciles(r["cpu_ms_per_turn"])
            r["late_over_early"] = late_over_early(r["cpu_ms_per_turn"])
            r["own_deciles"] = deciles(r["own_cpu_ms_per_turn"])
            r["own_late_over_early"] = late_over_early(r["own_cpu_ms_per_turn"])
    if out.get("bare") and out.get("suite") and out["bare"]["cpu_total_s"]:
        out["suite_over_bare_cpu"] = round(out["suite"]["cpu_total_s"]
                                           / out["bare"]["cpu_total_s"], 2)
        out["own_suite_over_bare_cpu"] = round(out["suite"]["own_cpu_total_s"]
                                               / out["bare"]["cpu_total_s"], 2)
    if out.get("audit_bytes_per_session") is not None:
        out["audit_over_distinct"] = round(out["audit_bytes_per_session"]
                                           / out["distinct_bytes_per_session"], 2)
    return out


def verdicts(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    s = res.get("suite") or {}
    rows = []
    for label, val, key in (
            ("suite CPU per turn, last quarter / first quarter (<= 1.5)",
             s.get("late_over_early"), "late_over_early"),
            ("suite/bare total CPU (<= 2.0)", res.get("suite_over_bare_cpu"),
             "suite_over_bare_cpu"),
            ("audit bytes per session / distinct content (<= 2.0)",
             res.get("audit_over_distinct"), "audit_over_distinct")):
        if val is None:
            rows.append((label, "n/a", "not measured"))
        else:
            rows.append((label, f"{val}", "met" if val <= TARGETS[key] else "MISSED"))
    return rows


def markdown(res: dict[str, Any]) -> str:
    out = ["## Multi-turn conversations (bench/bench_multiturn.py)", "",
           f"{res['agents']} agents x {res['turns']} turns, every request re-sending the "
           f"whole history (body {res['body_bytes_first'] / 1024:.1f} KB at turn 1, "
           f"{res['body_bytes_last'] / 1024:.1f} KB at the last), PII every ~1.1 KB; "
           "agents concurrent, in lock-step by turn; suite concerns: "
           f"{', '.join(res.get('active_concerns') or [])}.", ""]
    if res.get("error"):
        out += [f"**Error**: {res['error']}", ""]
    for note in res.get("notes") or []:
        out.append(f"- note: {note}")
    out += ["| target | measured | verdict |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in verdicts(res)]
    out += ["", "| | bare | suite |", "|---|---|---|"]
    b, s = res.get("bare") or {}, res.get("suite") or {}
    for label, key in (("CPU per turn by decile (ms)", "deciles"),
                       ("late/early CPU per turn", "late_over_early"),
                       ("total CPU with child processes (s)", "cpu_total_s"),
                       ("p50 latency (ms)", "p50_ms"),
                       ("p90 latency (ms)", "p90_ms"),
                       ("peak RSS with child processes (MiB)", "peak_rss_mib"),
                       ("peak RSS, mitmdump process alone (MiB)", "own_peak_rss_mib"),
                       ("total CPU, mitmdump process alone (s)", "own_cpu_total_s"),
                       ("CPU per turn by decile, mitmdump process alone (ms)",
                        "own_deciles"),
                       ("late/early CPU per turn, mitmdump process alone",
                        "own_late_over_early"),
                       ("errors", "errors")):
        out.append(f"| {label} | {b.get(key, 'n/a')} | {s.get(key, 'n/a')} |")
    if res.get("own_suite_over_bare_cpu") is not None:
        out += ["", "suite/bare total CPU, the mitmdump process alone (its writer process "
                f"left out): {res['own_suite_over_bare_cpu']}."]
    if res.get("audit_bytes_per_session") is not None:
        out += ["", f"Audit bytes per session: {res['audit_bytes_per_session']:,} for "
                f"{res['distinct_bytes_per_session']:,} bytes of distinct content sent "
                f"({res.get('audit_over_distinct')}x)."]
    if (held := res.get("audit_held_bytes_per_session")) is not None:
        out += ["", "Values the audit store holds per session (every text and blob value, "
                "before DuckDB compresses them; steadier than the data directory's growth, "
                f"which moves in whole DuckDB blocks): {held:,} "
                f"({held / res['distinct_bytes_per_session']:.2f}x)."]
    return "\n".join(out)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--agents", type=int)
    ap.add_argument("--turns", type=int)
    ap.add_argument("--json")
    ap.add_argument("--profile", help="write a py-spy profile (collapsed) of the suite here")
    ap.add_argument("--profile-rate", type=int, default=200,
                    help="py-spy samples per second (a 40-turn run is ~1 s of the suite's CPU: "
                         "raise it for more samples)")
    ap.add_argument("--concerns", default=",".join(e2e.CONCERNS),
                    help="the suite's concerns (default: all)")
    ap.add_argument("--in-process", action="store_true",
                    help="decode + masking per turn in this process, no proxy")
    ap.add_argument("--base", help="another checkout whose gateway runs interleaved with "
                                   "this one's (before/after in one invocation)")
    ap.add_argument("--repeats", type=int, default=1, help="with --base: rounds")
    a = ap.parse_args()
    if a.in_process:
        ip = in_process(a.agents or 6, a.turns or 40, a.profile)
        if a.json:
            Path(a.json).write_text(json.dumps(ip, indent=1))
        print(f"in process, {ip['agents']} agents x {ip['turns']} turns: decode + policy + "
              f"masking CPU per request by decile (ms) {ip['deciles']}; late/early "
              f"{ip['late_over_early']}; total {ip['cpu_total_ms']} ms; of which policy "
              f"(decode, facts, decision) {ip['policy_deciles']}, late/early "
              f"{ip['policy_late_over_early']}")
        sys.exit(0)
    r = run(quick=a.quick, agents=a.agents, turns=a.turns, profile=a.profile,
            concerns=tuple(c for c in a.concerns.split(",") if c), base=a.base,
            repeats=a.repeats, profile_rate=a.profile_rate)
    if a.base:
        if a.json:
            Path(a.json).write_text(json.dumps(r, indent=1))
        bare = r.get("bare") or {}
        print(f"bare: CPU/turn deciles {bare.get('deciles')} total {bare.get('cpu_total_s')} s")
        for k, v in r.items():
            if isinstance(v, dict) and k != "bare" and "deciles" in v:
                print(f"{k}: gateway alone deciles {v['own_deciles']} late/early "
                      f"{v['own_late_over_early']} total {v['own_cpu_total_s']} s "
                      f"(/bare {round(v['own_cpu_total_s'] / bare['cpu_total_s'], 2)}); "
                      f"with writer late/early {v['late_over_early']} total "
                      f"{v['cpu_total_s']} s (/bare "
                      f"{round(v['cpu_total_s'] / bare['cpu_total_s'], 2)}); "
                      f"p50 {v['p50_ms']} ms; peak RSS {v['own_peak_rss_mib']} / "
                      f"{v['peak_rss_mib']} MiB; errors {v['errors']}")
        sys.exit(1 if r.get("error") else 0)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    print(markdown(r))
    sys.exit(1 if r.get("error") else 0)

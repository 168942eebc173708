"""End-to-end load: direct to the upstream vs bare mitmdump vs the full agentgate suite.

One invocation starts everything, side by side, on 127.0.0.1:
- the upstream: nginx answering a canned OpenAI completion (fast and cheap in CPU, so it
  is not what limits a run) for the throughput runs; the stand-in (addons/devkit/standin.py) for
  streamed (SSE) replies, where it paces events 2 ms apart like a model would;
- `direct`: `hey` straight to the upstream;
- `bare`: `mitmdump` with no addon and the same TLS interception (the client trusts
  mitmproxy's CA, mitmdump verifies the upstream via ssl_verify_upstream_trusted_ca);
  for time to first token, a second bare mitmdump with a one-hook addon that streams
  `text/event-stream` replies (mitmdump buffers whole responses by default; the suite's
  masking streams SSE);
- `suite`: `mitmdump -s addons/gateway.py` with the concerns in `CONCERNS` switched on by
  rules (see `suite_rules`), a token from a local RS256 issuer on the CONNECT
  (`-x http://agent:TOKEN@proxy`, the documented HTTPS_PROXY form).

All three runs of a cell use the very same URL (the suite's upstreams declare the
upstream's `127.0.0.1:port`), so only the path through the proxy differs. Configurations are
interleaved and repeated; medians are reported, and mitmdump's CPU time per request, which
other load on a shared machine disturbs much less than wall-clock throughput.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench import harness as h

# The concerns the suite runs with; `--concerns` on the command line narrows it.
CONCERNS = ("identity", "policy", "masking", "recording")

TARGETS = {
    "throughput_ratio_c16_1k": 0.90,   # suite/bare req/s
    "added_p50_ms_c1": 0.3,            # suite p50 - bare p50
    "ttft_delta_ms": 2.0,              # suite TTFT - bare TTFT
    "rss_drift_pct": 5.0,              # soak
}

STREAM_SSE_ADDON = """\
def responseheaders(flow):
    if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
        flow.response.stream = True
"""

RULE_FILES = {"20-identity.yaml": "identity", "30-masking.yaml": "masking",
              "40-policies.yaml": "policy", "45-approvals.yaml": "policy",
              "50-recorder.yaml": "recording"}
# guard.py's step names (in "internal error in <step> (hook)") -> the concern to switch off
STEP_CONCERN = {"identity": "identity", "masking": "masking", "policy": "policy",
                "approval": "policy", "recorder": "recording"}

GATEWAY_ENV = {"OPENAI_API_KEY": "sk-bench-not-a-real-key-000000000000000000000000"}


# ---------------------------------------------------------------- suite rules
def suite_rules(upstream_hostport: str, standin_hostport: str, issuer: h.TokenIssuer | None,
                concerns: tuple[str, ...]) -> dict[str, str]:
    """Rules files for the suite, one file per concern so a concern can be left out.

    Everything on: tokens required and verified against the local issuer, every masking
    detector, a policy set whose block/approve rules are evaluated on every request but do
    not match the benchmark's traffic, and recording of every flow to DuckDB.
    """
    files = {"10-upstreams.yaml": textwrap.dedent(f"""\
        upstreams:
          - name: bench-openai
            hosts: ["{upstream_hostport}"]
            dialect: openai
            credential: {{header: Authorization, prefix: "Bearer ", env: OPENAI_API_KEY}}
          - name: bench-stream
            hosts: ["{standin_hostport}"]
            dialect: openai
            credential: {{header: Authorization, prefix: "Bearer ", env: OPENAI_API_KEY}}
        """)}
    if "identity" in concerns and issuer is not None:
        files["20-identity.yaml"] = textwrap.dedent(f"""\
            identity:
              required: true
              sources: [proxy, bearer, x-api-key]
              issuers:
                - issuer: {issuer.issuer}
                  audience: {issuer.audience}
                  jwks_uri: {issuer.issuer}/jwks.json
                  algorithms: [RS256]
            """)
    else:
        files["20-identity.yaml"] = "identity:\n  required: false\n"
    if "masking" in concerns:
        # every built-in detector is on by default
        files["30-masking.yaml"] = "masking:\n  enabled: true\n"
    else:
        files["30-masking.yaml"] = "masking:\n  enabled: false\n"
    if "policy" in concerns:
        # A realistic set: a model block list, a prompt scan (regex + words), an approval
        # rule on tool calls and a group allow rule, all evaluated on every request; none
        # blocks or holds the benchmark's traffic.
        files["40-policies.yaml"] = textwrap.dedent("""\
            policies:
              - name: restricted-models
                match: {model: ["gpt-5*", "claude-opus-*"]}
                action: block
                message: this model is not approved for agents
              - name: no-customer-ssn
                match: {prompt: {regex: ['\\b\\d{3}-\\d{2}-\\d{4}\\b'],
                                 words: [project bluebird]}}
                action: block
                message: forbidden content in prompt
              - name: destructive-tools
                match: {tools: ["delete_*", "drop_*"]}
                action: approve
                approvers: [reviewers]
                timeout: 60
              - name: agents-may-use-models
                match: {upstream: [bench-openai, bench-stream]}
                action: allow
            """)
    # the reviewers' API is part of the suite; on a free port (its default, 8081, may be
    # taken by another gateway on this machine)
    files["45-approvals.yaml"] = f"approvals:\n  listen: 127.0.0.1:{h.free_port()}\n"
    files["50-recorder.yaml"] = "recorder:\n  enabled: {}\n".format(
        "true" if "recording" in concerns else "false")
    return files


def write_rules(rules_dir: Path, files: dict[str, str]) -> dict[str, str]:
    """Write the rules and validate them as the gateway would. A file the current parsers
    reject is left out (and reported), so the run measures what exists today.

    Returns {file: reason} for each file left out.
    """
    from addons.config.loader import load_rules
    from addons.config.schema import ConfigError

    rules_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (rules_dir / name).write_text(text)
    dropped: dict[str, str] = {}
    for _ in range(len(files)):
        try:
            load_rules(rules_dir)
            return dropped
        except ConfigError as e:
            bad = Path(e.file).name
            if bad not in files or bad == "10-upstreams.yaml" or bad in dropped:
                raise
            dropped[bad] = f"{e.key}: {e.reason}"
            off = {"20-identity.yaml": "identity:\n  required: false\n",
                   "30-masking.yaml": "masking:\n  enabled: false\n",
                   "50-recorder.yaml": "recorder:\n  enabled: false\n"}.get(bad)
            if off:
                (rules_dir / bad).write_text(off)
            else:
                (rules_dir / bad).unlink()
    load_rules(rules_dir)
    return dropped


# ---------------------------------------------------------------- the run
def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"seconds": 1.5, "repeats": 1, "ttft_n": 10, "warmup_s": 0.5}
    return {"seconds": 5.0, "repeats": 2, "ttft_n": 40, "warmup_s": 1.0}


def _check(url: str, proxy: str | None, body: Path) -> str:
    """One request through a configuration; '' if it got a 2xx, else what went wrong
    (status, agentgate's refusal code and message)."""
    try:
        status, hdrs, data = h.one_request(url, body.read_bytes(), proxy=proxy)
    except (OSError, ConnectionError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    if 200 <= status < 300:
        return ""
    return f"status {status} {hdrs.get('x-agentgate-refused', '')} {data[:300]!r}"


class _Env:
    """What every configuration shares in one run: upstreams, CA, bodies, the issuer."""

    def __init__(self, tmp: Path, cfg: dict[str, Any], soak_minutes: float) -> None:
        self.tmp = tmp
        self.cfg = cfg
        self.soak_minutes = soak_minutes
        self.procs: list[h.Proc] = []
        self.issuer: h.TokenIssuer | None = None
        self.notes: list[str] = []
        self.n_suites = 0

    def spawn(self, p: h.Proc) -> h.Proc:
        self.procs.append(p)
        return p

    def start_suite(self, concerns: tuple[str, ...], name: str = "suite",
                    tree: Path | None = None, env: dict[str, str] | None = None
                    ) -> tuple[h.Proc, str, list[str], str]:
        """The suite with every concern asked for that works today: a concern whose rules
        today's parser rejects, or whose addon fails on the benchmark's request, is
        switched off (and said so in the notes) rather than sinking the whole comparison.
        `tree`: another checkout of agentgate (a git worktree at an older commit) to run
        the gateway from, for before/after comparisons in one invocation; `env`: more
        environment for the gateway (e.g. a glibc malloc tunable).
        Returns (process, proxy URL with the token, active concerns, error or '')."""
        tree_env = {"PYTHONPATH": str(tree)} if tree else {}
        root = tree or h.ROOT
        active = list(concerns)
        if "identity" in active and self.issuer is None:
            self.issuer = h.TokenIssuer().start()
        err = ""
        for _ in range(len(CONCERNS) + 1):
            self.n_suites += 1
            n = self.n_suites
            files = suite_rules(self.up_hostport, self.st_hostport, self.issuer, tuple(active))
            rules_dir = self.tmp / f"rules{n}"
            for f, why in write_rules(rules_dir, files).items():
                concern = RULE_FILES.get(f, f)
                if concern in active:
                    active.remove(concern)
                self.notes.append(f"{name}: {concern} left out: today's parser rejects {f} "
                                  f"({why})")
            token = self.issuer.token(lifetime=3600 + int(self.soak_minutes * 60)) \
                if self.issuer and "identity" in active else None
            data = self.tmp / f"data{n}"
            data.mkdir(exist_ok=True)
            suite = self.spawn(h.start_mitmdump(
                f"{name}{n}", self.tmp, self.confdir, self.upstream_ca,
                scripts=[str(root / "addons" / "gateway.py")],
                sets=[f"agentgate_rules={rules_dir}", f"agentgate_data={data}",
                      "agentgate_rules_poll_ms=0"],
                env={**GATEWAY_ENV, **tree_env, **(env or {}),
                     "AGENTGATE_RULES": str(rules_dir), "AGENTGATE_DATA": str(data)}))
            proxy = suite.url.replace("http://", f"http://agent:{token}@") if token \
                else suite.url
            err = _check(self.url, proxy, self.bodies["1KB"])
            if not err:
                return suite, proxy, active, ""
            if not suite.alive():
                return suite, proxy, active, (f"mitmdump exited: {err}\n"
                                              + suite.logs()[-1500:])
            failed = next((c for step, c in STEP_CONCERN.items()
                           if f"internal error in {step} " in err and c in active), None)
            if failed is None:
                return suite, proxy, active, err + "\n" + suite.logs()[-1500:]
            last = (suite.logs().strip().splitlines() or [""])[-1][:200]
            self.notes.append(f"{name}: {failed} switched off: its addon failed on the "
                              f"benchmark request ({err[:200]}); log: {last}")
            active.remove(failed)
            suite.stop()
        return suite, proxy, active, err

    def start_common(self, out: dict[str, Any]) -> tuple[h.Proc, h.Proc, str]:
        """Upstreams (nginx, the stand-in), mitmproxy's CA, the bodies and bare mitmdump,
        each checked with one request. Returns (stand-in, bare, error or '')."""
        tmp = self.tmp
        certs = tmp / "upstream-certs"
        self.upstream_ca, _, _ = h.upstream_certs(certs)
        standin = self.spawn(h.start_standin(tmp, certs, stream_delay=0.002))
        try:
            upstream = self.spawn(h.start_nginx(tmp, certs))
            out["upstream"] = "nginx (canned OpenAI completion)"
        except (RuntimeError, OSError) as e:
            upstream = standin
            out["upstream"] = "stand-in (nginx unavailable)"
            self.notes.append(f"nginx unavailable ({e}); throughput may be bounded by the "
                              "stand-in (apt-get install -y nginx-light)")
        self.up_hostport = upstream.url.removeprefix("https://")
        self.st_hostport = standin.url.removeprefix("https://")
        self.confdir = h.make_confdir(tmp / "mitm-conf")
        bare = self.spawn(h.start_mitmdump("bare", tmp, self.confdir, self.upstream_ca))
        self.bodies = {"1KB": tmp / "body-1k.json", "100KB": tmp / "body-100k.json"}
        self.bodies["1KB"].write_bytes(h.chat_body(1024))
        self.bodies["100KB"].write_bytes(h.chat_body(100 * 1024))
        self.url = upstream.url + "/v1/chat/completions"
        out["checks"] = {}
        for name, px in (("direct", None), ("bare", bare.url)):
            err = _check(self.url, px, self.bodies["1KB"])
            out["checks"][name] = err or "ok"
            if err:
                return standin, bare, f"{name} could not serve a request: {err}"
        return standin, bare, ""

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.issuer:
            self.issuer.stop()


def _measure(url: str, proxy: str | None, pid: int | None, conc: int, seconds: float,
             body: Path) -> dict[str, Any]:
    # CPU of the proxy and of its child processes (the suite's audit writer process): work
    # moved out of the gateway process still counts; the gateway process alone is kept beside
    cpu0 = h.tree_cpu_seconds(pid) if pid else 0.0
    own0 = h.cpu_seconds(pid) if pid else 0.0
    r = h.run_hey(url, concurrency=conc, seconds=seconds, proxy=proxy, body_file=body).as_dict()
    if pid and r["requests"]:
        r["cpu_ms_per_req"] = round((h.tree_cpu_seconds(pid) - cpu0) * 1000 / r["requests"], 3)
        r["own_cpu_ms_per_req"] = round((h.cpu_seconds(pid) - own0) * 1000 / r["requests"], 3)
    if pid:
        r["rss_kib_after"] = h.proc_status(pid).get("VmRSS")
    return r


def run(quick: bool = False, soak_minutes: float = 0, concerns: tuple[str, ...] = CONCERNS,
        profile_seconds: float = 0, breakdown: bool | None = None,
        workdir: Path | None = None) -> dict[str, Any]:
    """The whole comparison; see the module docstring. `breakdown` (default: not in quick
    mode) adds one suite per concern alone, to show what each one costs."""
    cfg = _settings(quick)
    breakdown = (not quick) if breakdown is None else breakdown
    if not h.HEY:
        return {"settings": cfg, "error": "hey is not installed (apt-get install -y hey)"}
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="agentgate-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"settings": cfg, "concerns": list(concerns)}
    env = _Env(tmp, cfg, soak_minutes)
    out["notes"] = env.notes
    try:
        standin, bare, err = env.start_common(out)
        if err:
            out["error"] = err
            return out
        # TTFT needs a bare mitmdump that streams SSE like the suite does; mitmdump buffers
        # whole responses unless told otherwise, and stream_large_bodies only kicks in after
        # that many bytes of a chunked reply. A one-hook addon is the minimum.
        sse_script = tmp / "stream_sse.py"
        sse_script.write_text(STREAM_SSE_ADDON)
        bare_sse = env.spawn(h.start_mitmdump("bare-sse", tmp, env.confdir, env.upstream_ca,
                                              scripts=[str(sse_script)]))
        bodies, url = env.bodies, env.url

        suite, suite_proxy, active, err = env.start_suite(concerns)
        out["checks"]["suite"] = err or "ok"
        out["active_concerns"] = active
        if err:
            out["error"] = f"suite could not serve a request: {err.splitlines()[0]}"
            out["suite_log_tail"] = "\n".join(err.splitlines()[1:])
            return out
        proxies = {"direct": None, "bare": bare.url, "suite": suite_proxy}
        pids = {"bare": bare.pid, "suite": suite.pid}

        # warm-up: certificates generated, JWKS fetched, code paths hot
        for px in proxies.values():
            h.run_hey(url, concurrency=16, seconds=cfg["warmup_s"], proxy=px,
                      body_file=bodies["1KB"])

        runs: dict[str, list[dict[str, Any]]] = {}
        order = list(proxies)
        for rep in range(cfg["repeats"]):
            for body_name, body in bodies.items():
                for conc in (1, 16):
                    # rotate the order each repetition so drift in machine load is shared
                    for name in order[rep % 3:] + order[:rep % 3]:
                        runs.setdefault(f"{name}|{body_name}|{conc}", []).append(_measure(
                            url, proxies[name], pids.get(name), conc, cfg["seconds"], body))
        out["cells"] = {k: _median_cell(v) for k, v in runs.items()}

        # streamed replies: time to first token (stand-in, events 2 ms apart)
        sbody = h.chat_body(400, stream=True)
        surl = standin.url + "/v1/chat/completions"
        out["ttft"] = {}
        for name, px in {**proxies, "bare": bare_sse.url}.items():
            try:
                out["ttft"][name] = h.ttft(surl, proxy=px, n=cfg["ttft_n"], body=sbody)
            except (OSError, ConnectionError) as e:
                out["ttft"][name] = {"error": f"{type(e).__name__}: {e}"}

        if profile_seconds > 0:
            out["profile"] = profile_under_load(
                {"bare": (bare.pid, bare.url), "suite": (suite.pid, suite_proxy)}, url,
                bodies["1KB"], profile_seconds, tmp)
        if soak_minutes > 0:
            out["soak"] = _soak(suite.pid, url, suite_proxy, bodies["1KB"], soak_minutes)
        out["rss_peak_kib"] = {n: h.proc_status(p).get("VmHWM") for n, p in pids.items()}
        # the gateway with its child processes: the sum of each one's peak (an upper bound)
        out["rss_peak_kib"]["suite+children"] = h.tree_kib(pids["suite"], "VmHWM")
        out["suite_log_errors"] = [line[:200] for line in suite.logs().splitlines()
                                   if "error" in line.lower()][:5]
        if breakdown:
            out["breakdown"] = _breakdown(env, bare, active)
        return out
    finally:
        env.stop()
        h.drop_workdir(tmp, workdir)


def compare(trees: dict[str, Path | None], concerns: tuple[str, ...] = CONCERNS,
            body_names: tuple[str, ...] = ("1KB",), concurrencies: tuple[int, ...] = (16, 1),
            seconds: float = 4.0, repeats: int = 4, profile_seconds: float = 0,
            workdir: Path | None = None, profile_body: str = "1KB",
            profile_rate: int = 0) -> dict[str, Any]:
    """Before/after in one invocation: bare mitmdump and one suite per tree ({name: a
    checkout of agentgate, e.g. a git worktree at the commit before a change; None: this
    one}), all against the same upstream, measured interleaved (the order rotates every
    repetition, so drift in the machine's load is shared) and repeated; medians. CPU per
    request (gateway and its children, and the gateway process alone) is the number to
    compare on a shared machine. With `profile_seconds`, py-spy --gil on each at c=16
    (`profile_body` sent, `profile_rate` samples per second)."""
    cfg = {**_settings(False), "seconds": seconds, "repeats": repeats}
    if not h.HEY:
        return {"error": "hey is not installed (apt-get install -y hey)"}
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="agentgate-compare-"))
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"settings": cfg, "concerns": list(concerns),
                           "trees": {k: str(v or h.ROOT) for k, v in trees.items()}}
    env = _Env(tmp, cfg, 0)
    out["notes"] = env.notes
    try:
        _standin, bare, err = env.start_common(out)
        if err:
            out["error"] = err
            return out
        proxies: dict[str, str | None] = {"bare": bare.url}
        pids = {"bare": bare.pid}
        for name, tree in trees.items():
            suite, proxy, active, err = env.start_suite(concerns, name=name, tree=tree)
            out["checks"][name] = err or f"ok ({','.join(active)})"
            if err:
                out["error"] = f"{name} could not serve a request: {err.splitlines()[0]}"
                return out
            proxies[name], pids[name] = proxy, suite.pid
        for px in proxies.values():
            h.run_hey(env.url, concurrency=16, seconds=cfg["warmup_s"], proxy=px,
                      body_file=env.bodies["1KB"])
        runs: dict[str, list[dict[str, Any]]] = {}
        order = list(proxies)
        for rep in range(repeats):
            for body_name in body_names:
                for conc in concurrencies:
                    k = rep % len(order)
                    for name in order[k:] + order[:k]:
                        runs.setdefault(f"{name}|{body_name}|{conc}", []).append(_measure(
                            env.url, proxies[name], pids[name], conc, seconds,
                            env.bodies[body_name]))
        out["cells"] = {k: _median_cell(v) for k, v in runs.items()}
        if profile_seconds > 0:
            out["profile"] = profile_under_load(
                {n: (pids[n], proxies[n]) for n in proxies}, env.url, env.bodies[profile_body],
                profile_seconds, tmp, rate=profile_rate or PROFILE_RATE)
        return out
    finally:
        env.stop()
        h.drop_workdir(tmp, workdir)


def compare_markdown(res: dict[str, Any]) -> str:
    """compare()'s cells, each configuration beside bare: req/s, p50, CPU per request."""
    if res.get("error"):
        return f"compare failed: {res['error']}"
    cells = res.get("cells") or {}
    lines = [f"trees: {res.get('trees')}; concerns: {', '.join(res.get('concerns', []))}; "
             f"{res['settings']['repeats']} x {res['settings']['seconds']:g} s, medians",
             "", "| config | body | c | req/s | / bare | p50 ms | added p50 | CPU ms/req "
             "(tree) | gateway process | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, c in cells.items():
        name, body, conc = key.split("|")
        b = cells.get(f"bare|{body}|{conc}") or {}
        ratio = round(c["rps"] / b["rps"], 3) if c.get("rps") and b.get("rps") else ""
        added = round(c["p50_ms"] - b["p50_ms"], 3) \
            if c.get("p50_ms") is not None and b.get("p50_ms") is not None else ""
        lines.append(f"| {name} | {body} | {conc} | {c['rps']} | {ratio} | {c['p50_ms']} | "
                     f"{added} | {c['cpu_ms_per_req']} | {c['own_cpu_ms_per_req']} | "
                     f"{c['errors']} |")
    for name, p in (res.get("profile") or {}).items():
        if isinstance(p, dict) and "ms_per_req" in p:
            lines.append(f"\nprofile {name}: GIL {p['ms_per_req']} ms/req, CPU "
                         f"{p.get('cpu_ms_per_req')} ms/req, agentgate {p['ours_ms_per_req']}"
                         f" ms/req ({p['ours_pct']} %)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=(
        "Compare agentgate trees (before/after a change) against bare mitmdump in one run."))
    ap.add_argument("--compare", nargs="+", metavar="NAME=PATH", required=True,
                    help="suites to run: NAME=PATH (a checkout, e.g. a git worktree) or "
                         "NAME=. for this tree")
    ap.add_argument("--concerns", default=",".join(CONCERNS))
    ap.add_argument("--bodies", default="1KB", help="1KB,100KB")
    ap.add_argument("--concurrency", default="16,1")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--profile-seconds", type=float, default=0)
    ap.add_argument("--profile-body", default="1KB", help="the body sent while profiling")
    ap.add_argument("--profile-rate", type=int, default=PROFILE_RATE,
                    help="py-spy samples per second")
    ap.add_argument("--workdir", default=None, help="keep logs and py-spy stacks here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    trees: dict[str, Path | None] = {}
    for spec in args.compare:
        name, sep, path = spec.partition("=")
        if not sep or not name or name == "bare":
            ap.error(f"--compare {spec!r}: want NAME=PATH (NAME not 'bare')")
        trees[name] = None if path in ("", ".") else Path(path).resolve()
    res = compare(trees, tuple(c for c in args.concerns.split(",") if c),
                  tuple(args.bodies.split(",")),
                  tuple(int(c) for c in args.concurrency.split(",")), args.seconds,
                  args.repeats, args.profile_seconds,
                  Path(args.workdir) if args.workdir else None, args.profile_body,
                  args.profile_rate)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(compare_markdown(res))
    return 1 if res.get("error") else 0


def _breakdown(env: _Env, bare: h.Proc, concerns: list[str]) -> dict[str, Any]:
    """One suite per concern alone (plus none: the frame only), each measured right after
    a bare run, 1 KB: c=16 throughput and CPU per request, c=1 p50."""
    out: dict[str, Any] = {}
    secs = max(2.0, env.cfg["seconds"] * 0.6)
    body = env.bodies["1KB"]
    for label, only in [("frame only (no concern)", ())] + [(c, (c,)) for c in concerns]:
        suite, proxy, active, err = env.start_suite(only, name=f"only-{label.split()[0]}")
        if err or (only and not active):
            out[label] = {"error": (err or "could not be switched on").splitlines()[0][:200]}
            suite.stop()
            continue
        h.run_hey(env.url, concurrency=16, seconds=env.cfg["warmup_s"], proxy=proxy,
                  body_file=body)
        b16 = _measure(env.url, bare.url, bare.pid, 16, secs, body)
        s16 = _measure(env.url, proxy, suite.pid, 16, secs, body)
        b1 = _measure(env.url, bare.url, bare.pid, 1, secs, body)
        s1 = _measure(env.url, proxy, suite.pid, 1, secs, body)
        out[label] = {
            "ratio_c16": round(s16["rps"] / b16["rps"], 3) if b16["rps"] else None,
            "rps_c16": s16["rps"], "bare_rps_c16": b16["rps"],
            "added_cpu_ms": round(s16.get("cpu_ms_per_req", 0) - b16.get("cpu_ms_per_req", 0),
                                  3),
            "added_p50_ms_c1": round(s1["p50_ms"] - b1["p50_ms"], 3),
            "errors": s16["errors"] + s1["errors"]}
        suite.stop()
    return out


def _median_cell(rs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        vals = [r[key] for r in rs if r.get(key) is not None and r.get("requests")]
        return round(statistics.median(vals), 3) if vals else None
    return {"rps": med("rps"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
            "mean_ms": med("mean_ms"), "cpu_ms_per_req": med("cpu_ms_per_req"),
            "own_cpu_ms_per_req": med("own_cpu_ms_per_req"),
            "rss_kib_after": max((r.get("rss_kib_after") or 0 for r in rs), default=0),
            "requests": sum(r["requests"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "runs": [{"rps": r["rps"], "p50_ms": r["p50_ms"]} for r in rs],
            "error_text": next((r["error_text"] for r in rs if r.get("error_text")), "")}


def _soak(pid: int, url: str, proxy: str, body: Path, minutes: float) -> dict[str, Any]:
    """Steady load on the suite for `minutes` (1 KB, 4 workers at 25 req/s each: 100 req/s,
    well under saturation, so it measures memory per request, not queueing), sampling its
    RSS; drift is judged after a warm-up fifth of the run."""
    interval = max(1.0, minutes * 60 / 300)
    with h.RssSampler(pid, interval) as sampler:
        r = h.run_hey(url, concurrency=4, rate=25, seconds=minutes * 60, proxy=proxy,
                      body_file=body, csv_out=False)
    d = h.rss_drift(sampler.samples)
    if r.errors:
        # what the failures look like (one more request now, with its body)
        try:
            st, hdrs, data = h.one_request(url, body.read_bytes(), proxy=proxy)
            d["after_soak"] = f"{st} {hdrs.get('x-agentgate-refused', '')} {data[:200]!r}"
        except (OSError, ConnectionError, ValueError) as e:
            d["after_soak"] = f"{type(e).__name__}: {e}"
    d.update(minutes=minutes, requests=r.requests, errors=r.errors, rps=r.rps,
             status=r.status, error_text=r.error_text[:300],
             trace=[(round(t), kib) for t, kib in
                    sampler.samples[:: max(1, -(-len(sampler.samples) // 20))]])
    return d


# ---------------------------------------------------------------- report
def ratios(res: dict[str, Any]) -> dict[str, Any]:
    cells = res.get("cells") or {}

    def get(cfg: str, body: str, c: int, key: str) -> float | None:
        return (cells.get(f"{cfg}|{body}|{c}") or {}).get(key)

    out: dict[str, Any] = {}
    for body in ("1KB", "100KB"):
        for c in (1, 16):
            s, b, d = (get(x, body, c, "rps") for x in ("suite", "bare", "direct"))
            out[f"suite/bare rps {body} c={c}"] = round(s / b, 3) if s and b else None
            out[f"bare/direct rps {body} c={c}"] = round(b / d, 3) if b and d else None
            sp, bp = get("suite", body, c, "p50_ms"), get("bare", body, c, "p50_ms")
            out[f"added p50 ms {body} c={c}"] = round(sp - bp, 3) \
                if sp is not None and bp is not None else None
            sc, bc = get("suite", body, c, "cpu_ms_per_req"), get("bare", body, c,
                                                                 "cpu_ms_per_req")
            out[f"added CPU ms/req {body} c={c}"] = round(sc - bc, 3) \
                if sc is not None and bc is not None else None
            # what the throughput ratio would be with each proxy alone on its own core:
            # CPU per request decides it, and other load on the machine hardly moves it
            out[f"suite/bare CPU-bound rps {body} c={c}"] = round(bc / sc, 3) \
                if sc and bc else None
    t = res.get("ttft") or {}
    if "ttft_p50_ms" in t.get("suite", {}) and "ttft_p50_ms" in t.get("bare", {}):
        out["ttft delta ms"] = round(t["suite"]["ttft_p50_ms"] - t["bare"]["ttft_p50_ms"], 3)
    return out


def targets(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, measured, verdict, note) rows for the summary table."""
    r = ratios(res)
    rows = []

    def row(name: str, value: float | None, limit: float, higher_is_better: bool,
            unit: str, fmt: str = "{:.3f}") -> None:
        if value is None:
            rows.append((name, "n/a", "not measured", ""))
            return
        ok = value >= limit if higher_is_better else value <= limit
        miss = "" if ok else (f"missed by {fmt.format(abs(value - limit))}{unit}")
        rows.append((name, fmt.format(value) + unit, "met" if ok else "MISSED", miss))

    row("suite/bare throughput, c=16, 1 KB (>= 0.90x)", r.get("suite/bare rps 1KB c=16"),
        TARGETS["throughput_ratio_c16_1k"], True, "x")
    row("  same, from CPU per request (bare CPU / suite CPU)",
        r.get("suite/bare CPU-bound rps 1KB c=16"), TARGETS["throughput_ratio_c16_1k"], True,
        "x")
    row("added p50 latency, c=1, 1 KB (<= 0.3 ms)", r.get("added p50 ms 1KB c=1"),
        TARGETS["added_p50_ms_c1"], False, " ms")
    row("added p50 latency, c=1, 100 KB (<= 0.3 ms)", r.get("added p50 ms 100KB c=1"),
        TARGETS["added_p50_ms_c1"], False, " ms")
    row("TTFT suite - bare (<= 2 ms)", r.get("ttft delta ms"), TARGETS["ttft_delta_ms"],
        False, " ms")
    soak = res.get("soak") or {}
    if soak.get("drift_pct") is not None:
        row(f"RSS drift over {soak['minutes']:g} min soak (< 5%)", soak["drift_pct"],
            TARGETS["rss_drift_pct"], False, " %", "{:.2f}")
    else:
        rows.append(("RSS drift over 10 min soak (< 5%)", "not run",
                     "run with --soak-minutes 10", ""))
    return rows


def bounds(res: dict[str, Any]) -> list[str]:
    """What bounds the missed targets, from this run's own measurements."""
    out: list[str] = []
    cells = res.get("cells") or {}
    bd = res.get("breakdown") or {}
    frame = (bd.get("frame only (no concern)") or {}).get("added_cpu_ms")
    costs = sorted(((k, v["added_cpu_ms"] - (frame or 0)) for k, v in bd.items()
                    if "error" not in v and not k.startswith("frame")), key=lambda kv: -kv[1])
    b1 = (cells.get("bare|1KB|16") or {}).get("cpu_ms_per_req")
    s1 = (cells.get("suite|1KB|16") or {}).get("cpu_ms_per_req")
    if b1 and s1:
        need = b1 / TARGETS["throughput_ratio_c16_1k"] - b1
        text = (f"1 KB: bare mitmdump spends {b1} ms of CPU per request and the suite {s1} ms; "
                f"0.90x would allow {need:.2f} ms of added CPU per request, the suite adds "
                f"{s1 - b1:.2f} ms")
        if costs:
            text += " (by concern, each alone minus the frame: " + ", ".join(
                f"{k} {v:.2f} ms" for k, v in costs) + (f"; frame {frame:.2f} ms" if frame
                                                      is not None else "") + ")"
        out.append(text + ". Added p50 at c=1 follows the event-loop share of the same work.")
    b100 = (cells.get("bare|100KB|1") or {}).get("cpu_ms_per_req")
    s100 = (cells.get("suite|100KB|1") or {}).get("cpu_ms_per_req")
    if b100 and s100:
        out.append(f"100 KB: {s100} ms of CPU per request in the suite vs {b100} ms bare: the "
                   "body-size-proportional work (masking detectors, policy prompt patterns, "
                   "recording the body) on one core decides it; see the component sections "
                   "for MB/s.")
    prof = (res.get("profile") or {}).get("suite") or {}
    mods = prof.get("ours_modules") or []
    if mods:
        out.append("Profile (1 KB, c=16), agentgate modules by GIL ms per request: " + ", ".join(
            f"{k.removeprefix('addons/')} {ms}" for k, _pct, ms in mods[:6]) + ".")
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = ["## End-to-end: direct vs bare mitmdump vs agentgate suite", ""]
    s = res.get("settings", {})
    on = ", ".join(res.get("active_concerns", [])) or "none"
    lines.append(
        f"Upstream: {res.get('upstream', '?')}; streamed replies from the stand-in (events "
        f"2 ms apart; for TTFT, bare = mitmdump + a one-hook addon streaming "
        f"text/event-stream). Load: `hey`, keep-alive, POST of an OpenAI chat request with "
        f"prose-like text (one email and one phone number per ~900 bytes). "
        f"{s.get('seconds')} s per run, {s.get('repeats')} interleaved repetition(s), "
        f"medians shown. Suite concerns on: **{on}**"
        f" (asked: {', '.join(res.get('concerns', []))}).")
    for n in res.get("notes", []):
        lines.append(f"\n> note: {n}")
    if res.get("error"):
        lines += ["", f"**E2E failed:** {res['error']}", "", "```",
                  res.get("suite_log_tail", ""), "```"]
        return "\n".join(lines)
    lines += ["", "| body | c | config | req/s | p50 ms | p99 ms | mean ms | CPU ms/req "
              "(with child processes) | of which the mitmdump process | errors |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    cells = res.get("cells", {})
    for body in ("1KB", "100KB"):
        for c in (1, 16):
            for cfg in ("direct", "bare", "suite"):
                x = cells.get(f"{cfg}|{body}|{c}")
                if not x:
                    continue
                cpu, own = x.get("cpu_ms_per_req"), x.get("own_cpu_ms_per_req")
                lines.append(f"| {body} | {c} | {cfg} | {x['rps']} | {x['p50_ms']} | "
                             f"{x['p99_ms']} | {x['mean_ms']} | "
                             f"{'' if cpu is None else cpu} | {'' if own is None else own} | "
                             f"{x['errors']} |")
    lines += ["", "Ratios (same run):", "", "| ratio | value |", "|---|---|"]
    for k, v in ratios(res).items():
        lines.append(f"| {k} | {v if v is not None else 'n/a'} |")
    bnd = bounds(res)
    if bnd:
        lines += ["", "What bounds it:", ""] + [f"- {b}" for b in bnd]
    t = res.get("ttft", {})
    if t:
        lines += ["", "### Time to first token (streamed, c=1, keep-alive)", "",
                  "| config | n | TTFT p50 ms | TTFT p90 ms | full stream p50 ms |",
                  "|---|---|---|---|---|"]
        for cfg in ("direct", "bare", "suite"):
            x = t.get(cfg, {})
            if "error" in x:
                lines.append(f"| {cfg} | error: {x['error']} | | | |")
            elif x:
                lines.append(f"| {cfg} | {x['n']} | {x['ttft_p50_ms']} | {x['ttft_p90_ms']} | "
                             f"{x['total_p50_ms']} |")
    bd = res.get("breakdown")
    if bd:
        lines += ["", "### What each concern costs (suite with only that concern on, 1 KB)", "",
                  "Each row is its own mitmdump with the frame (rules, upstreams, credentials, "
                  "annotate) plus one concern, measured right after bare mitmdump.", "",
                  "| concern | suite/bare req/s, c=16 | added CPU ms/req | of which the "
                  "concern (minus frame) | added p50 ms, c=1 |",
                  "|---|---|---|---|---|"]
        frame = (bd.get("frame only (no concern)") or {}).get("added_cpu_ms")
        for k, v in bd.items():
            if "error" in v:
                lines.append(f"| {k} | error: {v['error']} | | | |")
            else:
                alone = "" if frame is None or k.startswith("frame") else \
                    f"{v['added_cpu_ms'] - frame:.3f}"
                lines.append(f"| {k} | {v['ratio_c16']} ({v['rps_c16']} vs "
                             f"{v['bare_rps_c16']}) | {v['added_cpu_ms']} | {alone} | "
                             f"{v['added_p50_ms_c1']} |")
    rss = res.get("rss_peak_kib", {})
    if rss:
        lines += ["", "### Memory", "", "| process | peak RSS (VmHWM) |", "|---|---|"]
        for n, v in rss.items():
            lines.append(f"| mitmdump {n} | {v / 1024:.1f} MiB |" if v else f"| {n} | n/a |")
        phases = [(f"{b} c={c}", cells.get(f"suite|{b}|{c}", {}).get("rss_kib_after"),
                   cells.get(f"bare|{b}|{c}", {}).get("rss_kib_after"))
                  for b in ("1KB", "100KB") for c in (1, 16)]
        if any(v for _, v, _ in phases):
            lines += ["", "RSS after each load phase (largest over repetitions), suite / bare: "
                      + ", ".join(f"{k}: {(v or 0) / 1024:.0f} / {(bv or 0) / 1024:.0f} MiB"
                                  for k, v, bv in phases) + "."]
    soak = res.get("soak")
    if soak:
        lines += ["", f"Soak: {soak.get('minutes')} min at 100 req/s (4 workers), 1 KB, "
                  f"through the suite: "
                  f"{soak.get('requests')} requests ({soak.get('errors')} errors; status "
                  f"{soak.get('status')}"
                  + (f"; {soak['error_text']}" if soak.get("error_text") else "")
                  + (f"; then: {soak['after_soak']}" if soak.get("after_soak") else "")
                  + "), RSS "
                  f"{(soak.get('early_kib') or 0) / 1024:.1f} MiB after warm-up -> "
                  f"{(soak.get('late_kib') or 0) / 1024:.1f} MiB at the end "
                  f"(drift {soak.get('drift_pct')} %, max "
                  f"{(soak.get('max_kib') or 0) / 1024:.1f} MiB, {soak.get('samples')} "
                  "samples). RSS over time (s, MiB): "
                  + ", ".join(f"{t}: {k / 1024:.0f}" for t, k in soak.get("trace", []))
                  + "."]
    return "\n".join(lines)



# ---------------------------------------------------------------- profile
def py_spy() -> str | None:
    cand = h.BIN / "py-spy"
    return str(cand) if cand.exists() else shutil.which("py-spy")


PROFILE_RATE = 500  # samples per second


def _spy(pid: int, url: str, proxy: str | None, body: Path, seconds: float, raw: Path,
         concurrency: int, rate: int = PROFILE_RATE) -> dict[str, Any]:
    """py-spy --gil on one process while hey loads it: stacks of whoever holds the GIL,
    i.e. the Python work, plus per-thread CPU from /proc and the requests served."""
    import subprocess
    import threading

    spy = py_spy()
    if not spy:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    res: dict[str, h.LoadResult] = {}

    def load() -> None:
        res["r"] = h.run_hey(url, concurrency=concurrency, seconds=seconds + 2, proxy=proxy,
                             body_file=body)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    time.sleep(1.0)  # connections and TLS set up before sampling starts
    cpu0, t0 = h.thread_cpu(pid), time.monotonic()
    try:
        p = subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                            "--rate", str(rate), "--format", "raw", "--output",
                            str(raw), "--nonblocking", "--gil"], capture_output=True,
                           text=True, timeout=seconds + 60)
    finally:
        cpu1, t1 = h.thread_cpu(pid), time.monotonic()
        t.join(seconds + 60)
    if p.returncode != 0 or not raw.exists():
        return {"error": (p.stderr or p.stdout).strip()[-500:] or f"py-spy exit {p.returncode}"}
    r = res.get("r")
    nreq = (r.rps if r else 0) * int(seconds)
    wall = max(t1 - t0, 1e-6)
    summary = summarise_stacks(raw.read_text(), rate=rate, requests=nreq)
    summary.update(
        rps=r.rps if r else 0,
        cpu_main=round((cpu1.get(pid, 0) - cpu0.get(pid, 0)) / wall, 2),
        cpu_other_threads=round(sum(v - cpu0.get(tid, 0) for tid, v in cpu1.items()
                                    if tid != pid) / wall, 2),
        cpu_ms_per_req=round(sum(v - cpu0.get(tid, 0) for tid, v in cpu1.items()) * 1000
                             / nreq, 3) if nreq else None)
    return summary


def profile_under_load(targets: dict[str, tuple[int, str | None]], url: str, body: Path,
                       seconds: float, workdir: Path, concurrency: int = 16,
                       rate: int = PROFILE_RATE) -> dict[str, Any]:
    """Profile bare mitmdump and the suite alike, so the difference per request shows
    what the suite adds and where: {name: summary}."""
    out: dict[str, Any] = {"seconds": seconds, "concurrency": concurrency, "rate": rate}
    for name, (pid, proxy) in targets.items():
        out[name] = _spy(pid, url, proxy, body, seconds, workdir / f"profile-{name}.txt",
                         concurrency, rate)
    return out


def _frame_key(frame: str) -> tuple[str, str]:
    """'func (path/to/file.py:123)' -> ('func', 'path/to/file.py'); py-spy already gives
    paths relative to sys.path (addons/x.py, mitmproxy/…, asyncio/…)."""
    name, _, loc = frame.partition(" (")
    path = loc.rstrip(")").rsplit(":", 1)[0]
    root = str(h.ROOT) + "/"
    if path.startswith(root):
        path = path[len(root):]
    elif "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return name.strip(), path


def _area(label: str) -> str:
    first, _, rest = label.partition("/")
    if first == "addons":
        return "agentgate " + rest.removesuffix(".py")
    if first == "mitmproxy":
        return "mitmproxy " + (rest.split("/")[0].removesuffix(".py") if rest else "")
    if first in ("asyncio", "selectors.py"):
        return "asyncio event loop"
    if first in ("OpenSSL", "ssl.py", "cryptography"):
        return "TLS (pyOpenSSL/ssl)"
    return first.removesuffix(".py")


def _thread_of(frames: list[tuple[str, str]]) -> str:
    """Worker threads start in threading's bootstrap; everything else is the event loop
    (py-spy's non-blocking sampling sometimes cuts the bottom of a main-thread stack)."""
    if not frames or not frames[0][1].startswith("threading.py"):
        return "event loop (main thread)"
    for name, label in frames:
        if not label.startswith(("threading.py", "concurrent/")):
            return f"thread: {name} ({label})"
    return "thread: " + frames[-1][0]


def summarise_stacks(text: str, rate: int = PROFILE_RATE, requests: float = 0,
                     top: int = 20) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> where the time goes: by thread, by area of the
    leaf frame (our modules, mitmproxy, TLS, asyncio …), and by agentgate function with
    the library calls it makes (attributed to the innermost agentgate frame; guard.py's
    wrapper is skipped). With `requests`, also in milliseconds per request."""
    total = 0
    threads: dict[str, int] = {}
    areas: dict[str, int] = {}
    ours_fn: dict[str, int] = {}
    ours_mod: dict[str, int] = {}
    ours_any = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_frame_key(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        thread = _thread_of(frames)
        threads[thread] = threads.get(thread, 0) + count
        area = _area(frames[-1][1])
        areas[area] = areas.get(area, 0) + count
        ours = [f for f in frames if f[1].startswith("addons/") and f[1] != "addons/frame/guard.py"]
        if ours:
            ours_any += count
            name, label = ours[-1]
            key = f"{name} ({label})"
            ours_fn[key] = ours_fn.get(key, 0) + count
            ours_mod[label] = ours_mod.get(label, 0) + count

    def rows(d: dict[str, int], n: int = top) -> list[tuple[str, float, float | None]]:
        """(key, % of samples, ms per request or None)."""
        if not total:
            return []
        return [(k, round(v * 100 / total, 1),
                 round(v * 1000 / rate / requests, 4) if requests else None)
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {"samples": total, "requests": round(requests),
            "ms_per_req": round(total * 1000 / rate / requests, 3) if requests else None,
            "ours_pct": round(ours_any * 100 / total, 1) if total else 0.0,
            "ours_ms_per_req": round(ours_any * 1000 / rate / requests, 3)
            if requests else None,
            "threads": rows(threads, 6), "areas": rows(areas, 40),
            "ours_functions": rows(ours_fn), "ours_modules": rows(ours_mod)}


def profile_markdown(p: dict[str, Any]) -> str:
    lines = ["## Profile: where the suite's time goes", ""]
    bare, suite = p.get("bare") or {}, p.get("suite") or {}
    if p.get("error") or suite.get("error") or not suite:
        return "\n".join(lines + [f"Not profiled: {p.get('error') or suite.get('error')}"])
    lines.append(
        f"py-spy `--gil` at {p.get('rate')} Hz, {p.get('seconds'):g} s on each of bare "
        f"mitmdump and the suite while `hey` sends 1 KB prompts at c={p.get('concurrency')}. "
        "A sample is taken from whichever thread holds the GIL, so the samples add up to the "
        "Python work of the process; divided by the requests served in the window they give "
        "**GIL milliseconds per request**, comparable between the two. CPU per request is "
        "from /proc (all threads, including native code that runs without the GIL).")
    lines += ["", "| | bare | suite | added |", "|---|---|---|---|"]

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v}"

    b_ms, s_ms = bare.get("ms_per_req"), suite.get("ms_per_req")
    lines.append(f"| GIL ms per request | {fmt(b_ms)} | {fmt(s_ms)} | "
                 f"{fmt(round(s_ms - b_ms, 3) if b_ms and s_ms else None)} |")
    b_cpu, s_cpu = bare.get("cpu_ms_per_req"), suite.get("cpu_ms_per_req")
    lines.append(f"| CPU ms per request | {fmt(b_cpu)} | {fmt(s_cpu)} | "
                 f"{fmt(round(s_cpu - b_cpu, 3) if b_cpu and s_cpu else None)} |")
    lines.append(f"| req/s while profiled | {fmt(bare.get('rps'))} | {fmt(suite.get('rps'))} | |")
    lines.append(f"| cores busy: event loop / other threads | {bare.get('cpu_main')} / "
                 f"{bare.get('cpu_other_threads')} | {suite.get('cpu_main')} / "
                 f"{suite.get('cpu_other_threads')} | |")
    lines.append(f"| in agentgate code (innermost frame in addons/) | 0 | "
                 f"{fmt(suite.get('ours_ms_per_req'))} ms ({suite.get('ours_pct')} %) | |")
    b_areas = {k: ms for k, _pct, ms in bare.get("areas", [])}
    lines += ["", "GIL ms per request by area (leaf frame), largest additions first:", "",
              "| area | bare | suite | added |", "|---|---|---|---|"]
    s_areas = {k: ms for k, _pct, ms in suite.get("areas", [])}
    keys = sorted(set(b_areas) | set(s_areas),
                  key=lambda k: -((s_areas.get(k) or 0) - (b_areas.get(k) or 0)))
    for k in keys[:14]:
        bv, sv = b_areas.get(k) or 0, s_areas.get(k) or 0
        lines.append(f"| {k} | {bv:.3f} | {sv:.3f} | {sv - bv:+.3f} |")
    lines += ["", "Suite, by agentgate module (its own code and the library calls it makes):",
              "", "| module | GIL ms/req | % of the suite's samples |", "|---|---|---|"]
    lines += [f"| {k} | {ms} | {pct} |" for k, pct, ms in suite.get("ours_modules", [])[:12]]
    lines += ["", "Suite, top agentgate functions (same attribution):", "",
              "| function | GIL ms/req | % |", "|---|---|---|"]
    lines += [f"| `{k}` | {ms} | {pct} |" for k, pct, ms in suite.get("ours_functions", [])[:15]]
    lines += ["", "Suite, GIL samples by thread:", "", "| thread | % |", "|---|---|"]
    lines += [f"| {k} | {pct} |" for k, pct, _ms in suite.get("threads", [])]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

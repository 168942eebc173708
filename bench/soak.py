"""Memory of the gateway process: RSS by phase and by mapping, and the soak (RSS drift).

`python -m bench --only soak [--soak-minutes 10] [--concerns …]` runs this alone (without
the rest of the end-to-end comparison): nginx upstream, a bare mitmdump and the suite
(same settings as bench/e2e.py), then
- RSS of both right after start (one request served), after a warm-up, after 1 KB and
  100 KB load at c=16, and their peaks (VmHWM): the "peak RSS <= 2x bare" target;
- where the suite's RSS is (/proc/PID/smaps, grouped by mapping: anonymous memory, which
  is the Python heap and native allocations, vs each shared library's resident pages);
- the soak: `minutes` at 100 req/s (4 workers x 25 req/s, 1 KB) through the suite, RSS
  sampled every `minutes*60/300` s, drift = median of the last tenth vs median of the
  tenth right after a warm-up fifth (bench/harness.rss_drift): the "< 5%" target.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import e2e
from bench import harness as h

RSS_RATIO_TARGET = 2.0
DRIFT_TARGET_PCT = 5.0


def smaps(pid: int, top: int = 12) -> dict[str, Any]:
    """Resident KiB of a process by mapping: anonymous (heap, arenas, thread stacks) and
    each file (shared libraries, Python extension modules), largest first."""
    by: dict[str, int] = {}
    name = ""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split(None, 5)
            path = parts[5].strip() if len(parts) > 5 else ""
            name = (os.path.basename(path) if path.startswith("/") else
                    (path or "[anon]"))
        elif line.startswith("Rss:"):
            by[name] = by.get(name, 0) + int(line.split()[1])
    anon = sum(v for k, v in by.items() if k.startswith("[") or k == "[anon]")
    files = sorted(((k, v) for k, v in by.items() if not k.startswith("[")),
                   key=lambda kv: -kv[1])
    return {"rss_kib": sum(by.values()), "anon_kib": anon,
            "file_kib": sum(v for _, v in files),
            "top_files": [(k, v) for k, v in files[:top]],
            "anon_parts": sorted(((k, v) for k, v in by.items() if k.startswith("[")),
                                 key=lambda kv: -kv[1])[:4]}


def _phase(pids: dict[str, int]) -> dict[str, int | None]:
    out = {n: h.proc_status(p).get("VmRSS") for n, p in pids.items()}
    out["suite+children"] = h.tree_kib(pids["suite"])
    return out


class TreeSampler(h.RssSampler):
    """RssSampler of the gateway that also samples the gateway with its children."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(pid, interval)
        self.tree: list[tuple[float, int]] = []

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            rss = h.proc_status(self.pid).get("VmRSS")
            if rss is None:
                return
            t = time.monotonic() - t0
            self.samples.append((t, rss))
            self.tree.append((t, h.tree_kib(self.pid) or rss))
            self._stop.wait(self.interval)


def soak(pid: int, url: str, proxy: str, body: Path, minutes: float) -> dict[str, Any]:
    """Steady load on the suite for `minutes` (1 KB, 4 workers at 25 req/s each: 100 req/s,
    well under saturation, so it measures memory per request, not queueing), sampling the
    RSS of the gateway and of the gateway with its children; drift is judged after a
    warm-up fifth of the run (harness.rss_drift)."""
    interval = max(1.0, minutes * 60 / 300)
    with TreeSampler(pid, interval) as sampler:
        r = h.run_hey(url, concurrency=4, rate=25, seconds=minutes * 60, proxy=proxy,
                      body_file=body, csv_out=False)
    d = h.rss_drift(sampler.samples)
    tree = h.rss_drift(sampler.tree)
    step = max(1, -(-len(sampler.samples) // 20))
    d.update(minutes=minutes, requests=r.requests, errors=r.errors, rps=r.rps,
             status=r.status, error_text=r.error_text[:300],
             trace=[(round(t), kib) for t, kib in sampler.samples[::step]],
             tree=tree, tree_trace=[(round(t), kib) for t, kib in sampler.tree[::step]])
    if r.errors:
        err = e2e._check(url, proxy, body)
        d["after_soak"] = err or "a request after the soak succeeded"
    return d


def run(minutes: float = 10.0, concerns: tuple[str, ...] = e2e.CONCERNS, quick: bool = False,
        workdir: Path | None = None) -> dict[str, Any]:
    """Memory phases for bare and suite, then the soak on the suite; never raises for a
    failing configuration (the error is in the result)."""
    if not h.HEY:
        return {"error": "hey is not installed (apt-get install -y hey)"}
    cfg = {"seconds": 2.0 if quick else 5.0, "warmup_s": 1.0}
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="agentgate-soak-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = e2e._Env(tmp, cfg, minutes)
    out: dict[str, Any] = {"concerns": list(concerns), "notes": env.notes,
                           "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}
    try:
        certs = tmp / "upstream-certs"
        env.upstream_ca, _, _ = h.upstream_certs(certs)
        standin = env.spawn(h.start_standin(tmp, certs))
        try:
            upstream = env.spawn(h.start_nginx(tmp, certs))
        except (RuntimeError, OSError) as e:
            upstream = standin
            env.notes.append(f"nginx unavailable ({e}); the stand-in answers instead")
        env.up_hostport = upstream.url.removeprefix("https://")
        env.st_hostport = standin.url.removeprefix("https://")
        env.confdir = h.make_confdir(tmp / "mitm-conf")
        env.bodies = bodies = {"1KB": tmp / "body-1k.json", "100KB": tmp / "body-100k.json"}
        bodies["1KB"].write_bytes(h.chat_body(1024))
        bodies["100KB"].write_bytes(h.chat_body(100 * 1024))
        env.url = url = upstream.url + "/v1/chat/completions"
        bare = env.spawn(h.start_mitmdump("bare", tmp, env.confdir, env.upstream_ca))
        err = e2e._check(url, bare.url, bodies["1KB"])
        if err:
            out["error"] = f"bare mitmdump could not serve a request: {err}"
            return out
        suite, proxy, active, err = env.start_suite(concerns)
        out["active_concerns"] = active
        if err:
            out["error"] = f"suite could not serve a request: {err.splitlines()[0]}"
            return out
        pids = {"bare": bare.pid, "suite": suite.pid}
        proxies = {"bare": bare.url, "suite": proxy}
        phases: dict[str, dict[str, int | None]] = {"after start (1 request)": _phase(pids)}
        out["smaps_start"] = smaps(suite.pid)
        for px in proxies.values():
            h.run_hey(url, concurrency=16, seconds=cfg["warmup_s"], proxy=px,
                      body_file=bodies["1KB"])
        phases["after warm-up"] = _phase(pids)
        for body_name in ("1KB", "100KB"):
            for name, px in proxies.items():
                r = h.run_hey(url, concurrency=16, seconds=cfg["seconds"], proxy=px,
                              body_file=bodies[body_name])
                out.setdefault("load", {})[f"{name} {body_name} c=16"] = {
                    "requests": r.requests, "errors": r.errors, "rps": r.rps}
            phases[f"after {body_name} c=16"] = _phase(pids)
        out["phases"] = phases
        out["peak_before_soak_kib"] = _peaks(pids)
        out["smaps_loaded"] = smaps(suite.pid)
        if minutes > 0:
            out["soak"] = soak(suite.pid, url, proxy, bodies["1KB"], minutes)
            out["smaps_end"] = smaps(suite.pid)
        out["peak_kib"] = _peaks(pids)
        return out
    except Exception as e:  # noqa: BLE001 - the report says what failed
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    finally:
        env.stop()
        h.drop_workdir(tmp, workdir)


def _peaks(pids: dict[str, int]) -> dict[str, int | None]:
    """VmHWM of bare and suite; for the suite with its children, the sum of each process's
    own peak (an upper bound: the peaks need not coincide)."""
    out = {n: h.proc_status(p).get("VmHWM") for n, p in pids.items()}
    out["suite+children"] = h.tree_kib(pids["suite"], "VmHWM")
    return out


def _mib(kib: int | float | None) -> str:
    return "n/a" if not kib else f"{kib / 1024:.1f}"


def markdown(res: dict[str, Any]) -> str:
    lines = ["## Memory and soak (`python -m bench --only soak`)", ""]
    if res.get("error"):
        return "\n".join(lines + [f"Failed: {res['error']}"])
    lines += [f"Suite concerns: {', '.join(res.get('active_concerns', []))}; "
              f"MALLOC_ARENA_MAX={res.get('malloc_arena_max') or 'unset'} in the bench's "
              "environment. \"suite + children\" adds the processes the gateway started (the "
              "audit writer process, when recording runs in one); its peak is the sum of each "
              "process's own peak.", "",
              "| phase | bare RSS MiB | suite RSS MiB | suite / bare | suite + children MiB "
              "| (suite + children) / bare |", "|---|---|---|---|---|---|"]
    rows = list((res.get("phases") or {}).items())
    peak = res.get("peak_kib") or res.get("peak_before_soak_kib") or {}
    rows.append(("peak (VmHWM, whole run)", peak))
    for phase, v in rows:
        b, s, t = v.get("bare"), v.get("suite"), v.get("suite+children")
        ratio = f"{s / b:.2f}" if b and s else "n/a"
        tratio = f"{t / b:.2f}" if b and t else "n/a"
        lines.append(f"| {phase} | {_mib(b)} | {_mib(s)} | {ratio} | {_mib(t)} | {tratio} |")
    if peak.get("bare") and peak.get("suite"):
        r = peak["suite"] / peak["bare"]
        t = (peak.get("suite+children") or peak["suite"]) / peak["bare"]
        lines += ["", f"Peak RSS suite/bare {r:.2f}, with its children {t:.2f} (target <= "
                  f"{RSS_RATIO_TARGET:g}): **{'met' if max(r, t) <= RSS_RATIO_TARGET else 'MISSED'}"
                  "**."]
    for key, title in (("smaps_start", "after start"), ("smaps_loaded", "after the loads"),
                       ("smaps_end", "after the soak")):
        sm = res.get(key)
        if sm:
            files = ", ".join(f"{n} {_mib(k)}" for n, k in sm["top_files"][:8])
            lines += ["", f"Suite RSS {title}: {_mib(sm['rss_kib'])} MiB = anonymous "
                      f"{_mib(sm['anon_kib'])} + files {_mib(sm['file_kib'])} (largest: "
                      f"{files})."]
    soak = res.get("soak")
    if soak:
        d = soak.get("drift_pct")
        verdict = "n/a" if d is None else ("met" if d < DRIFT_TARGET_PCT else "MISSED")
        lines += ["", f"Soak: {soak['minutes']:g} min at 100 req/s (4 workers), 1 KB, "
                  f"through the suite: {soak.get('requests')} requests, {soak.get('errors')} "
                  f"errors (status {soak.get('status')}); RSS {_mib(soak.get('early_kib'))} "
                  f"MiB after warm-up -> {_mib(soak.get('late_kib'))} MiB at the end: drift "
                  f"**{d} %** (target < {DRIFT_TARGET_PCT:g} %: **{verdict}**), max "
                  f"{_mib(soak.get('max_kib'))} MiB. RSS over time (s, MiB): "
                  + ", ".join(f"{t}: {k / 1024:.0f}" for t, k in soak.get("trace", []))]
        tree = soak.get("tree") or {}
        if tree.get("drift_pct") is not None and soak.get("tree_trace") != soak.get("trace"):
            td = tree["drift_pct"]
            lines += ["", f"With its children: {_mib(tree.get('early_kib'))} -> "
                      f"{_mib(tree.get('late_kib'))} MiB, drift **{td} %** (**"
                      f"{'met' if td < DRIFT_TARGET_PCT else 'MISSED'}**), max "
                      f"{_mib(tree.get('max_kib'))} MiB. Over time (s, MiB): "
                      + ", ".join(f"{t}: {k / 1024:.0f}" for t, k in soak["tree_trace"])]
        if soak.get("after_soak"):
            lines.append(f"A request after the soak: {soak['after_soak']}")
    if res.get("notes"):
        lines += ["", "Notes: " + "; ".join(res["notes"])]
    return "\n".join(lines)

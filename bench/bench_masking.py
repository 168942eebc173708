"""Masking: body throughput on one core, and added time to first token of a stream.

1. Throughput: an OpenAI chat request body of 1 KB, 100 KB and 1 MB of prose (one e-mail
   and one phone number per ~900 bytes, `bench.harness.chat_body`), masked the way the
   gateway's request hook does it — JSON parse, one detector pass over all text slots
   with every built-in detector on, placeholders, rebuild, serialise — in this process on
   one core (CPU time). Beside it: the detectors alone on the same text, so the cost of
   placement is visible, and a 100 KB streamed answer through the incremental SSE masker
   (8-character deltas, as the stand-in sends them).
2. Time to first token of a streamed chat completion (the stand-in paces SSE events 2 ms
   apart), sequential requests on one keep-alive connection, in the same run:
   `bare` = `mitmdump` with no script and the same TLS interception (it buffers the whole
   response, as mitmproxy does by default), `bare-sse` = mitmdump with a one-hook addon
   that only streams text/event-stream (the fair baseline), `suite` = `mitmdump -s
   addons/gateway.py` with identity (token on the CONNECT), policy, masking and recording,
   and `suite-nomask` the same with masking off (masking's own share).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness as h

SIZES = {"1KB": 1024, "100KB": 100 * 1024, "1MB": 1024 * 1024}


def _cpu_per_op(fn: Any, min_seconds: float, min_runs: int) -> float:
    """CPU seconds per call (process time: one core, unaffected by other processes'
    wall-clock share)."""
    fn()  # warm
    runs = 0
    t0 = time.process_time()
    while True:
        fn()
        runs += 1
        spent = time.process_time() - t0
        if runs >= min_runs and spent >= min_seconds:
            return spent / runs


def throughput(quick: bool) -> dict[str, Any]:
    from addons.masking.bodies import Masked
    from addons.masking.config import MaskingConfig
    from addons.masking.detectors import DetectorSet
    from addons.masking.masker import Masker, Session
    from addons.masking.sse import StreamMasker

    det = DetectorSet(MaskingConfig())  # every built-in detector on
    masker = Masker(det, b"bench-key")
    session = Session()
    min_s = 0.3 if quick else 1.5
    out: dict[str, Any] = {"detectors": len(det.entities)}
    for name, size in SIZES.items():
        body = h.chat_body(size)
        text = json.loads(body)["messages"][1]["content"]
        found: dict = {}

        def mask_body(body: bytes = body) -> bytes | None:
            return Masked(masker, session, {}, dialect="openai").body(body, "application/json")

        masked = mask_body()
        Masked(masker, session, found, dialect="openai").body(body, "application/json")
        t_body = _cpu_per_op(mask_body, min_s, 3)
        t_find = _cpu_per_op(lambda text=text: det.find(text), min_s, 3)
        out[name] = {
            "bytes": len(body),
            "findings": sum(v["count"] for v in found.values()),
            "changed": masked is not None,
            "ms_per_body": round(t_body * 1000, 3),
            "mb_per_s": round(len(body) / t_body / 1e6, 2),
            "detect_only_mb_per_s": round(len(text.encode()) / t_find / 1e6, 2),
            "placement_overhead_pct": round((t_body / t_find - 1) * 100, 1),
        }
    # a streamed answer: 100 KB of prose in 8-character deltas
    text = json.loads(h.chat_body(100 * 1024))["messages"][1]["content"]
    events = b"".join(
        b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": text[i:i + 8]}, "finish_reason": None}]}).encode()
        + b"\n\n" for i in range(0, len(text), 8)) + b"data: [DONE]\n\n"

    def stream() -> None:
        sm = StreamMasker(Masked(masker, session, {}, restorable=False, dialect="openai"))
        for i in range(0, len(events), 1400):  # network-sized chunks
            sm(events[i:i + 1400])
        sm(b"")

    t_stream = _cpu_per_op(stream, min_s, 2)
    out["sse_100KB"] = {"text_bytes": len(text), "deltas": len(text) // 8,
                        "ms_per_stream": round(t_stream * 1000, 2),
                        "text_mb_per_s": round(len(text) / t_stream / 1e6, 2),
                        "us_per_delta": round(t_stream / (len(text) / 8) * 1e6, 1)}
    out["mb_per_s_all_detectors"] = out["1MB"]["mb_per_s"]
    return out


STREAM_SSE_ADDON = """\
def responseheaders(flow):
    if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
        flow.response.stream = True
"""


def ttft(quick: bool) -> dict[str, Any]:
    from bench.e2e import GATEWAY_ENV, suite_rules, write_rules

    n = 10 if quick else 30
    rounds = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="agentgate-bench-masking-"))
    procs: list[h.Proc] = []
    issuer = None
    out: dict[str, Any] = {"n_per_round": n, "rounds": rounds, "notes": []}
    try:
        certs = tmp / "certs"
        upstream_ca, _, _ = h.upstream_certs(certs)
        standin = h.start_standin(tmp, certs, stream_delay=0.002)
        procs.append(standin)
        hostport = standin.url.removeprefix("https://")
        confdir = h.make_confdir(tmp / "conf")
        bare = h.start_mitmdump("bare", tmp, confdir, upstream_ca)
        procs.append(bare)
        script = tmp / "stream_sse.py"
        script.write_text(STREAM_SSE_ADDON)
        bare_sse = h.start_mitmdump("bare-sse", tmp, confdir, upstream_ca,
                                    scripts=[str(script)])
        procs.append(bare_sse)
        issuer = h.TokenIssuer().start()
        rules = tmp / "rules"
        dropped = write_rules(rules, suite_rules(hostport, hostport, issuer,
                                                 ("identity", "policy", "masking",
                                                  "recording")))
        for f, why in dropped.items():
            out["notes"].append(f"{f} left out ({why})")
        # the same suite with masking off, to show masking's own share
        rules_off = tmp / "rules-nomask"
        write_rules(rules_off, suite_rules(hostport, hostport, issuer,
                                           ("identity", "policy", "recording")))

        def suite_proc(name: str, rules_dir: Path) -> h.Proc:
            data = tmp / f"data-{name}"
            data.mkdir()
            p = h.start_mitmdump(
                name, tmp, confdir, upstream_ca,
                scripts=[str(h.ROOT / "addons" / "gateway.py")],
                sets=[f"agentgate_rules={rules_dir}", f"agentgate_data={data}",
                      "agentgate_rules_poll_ms=0"],
                env={**GATEWAY_ENV, "AGENTGATE_RULES": str(rules_dir),
                     "AGENTGATE_DATA": str(data)})
            procs.append(p)
            return p

        suite = suite_proc("suite", rules)
        suite_off = suite_proc("suite-nomask", rules_off)
        token = issuer.token(lifetime=3600)
        proxies = {"bare": bare.url, "bare-sse": bare_sse.url,
                   "suite-nomask": suite_off.url.replace("http://", f"http://agent:{token}@"),
                   "suite": suite.url.replace("http://", f"http://agent:{token}@")}
        url = standin.url + "/v1/chat/completions"
        body = h.chat_body(1024, stream=True)
        status, _, resp = h.one_request(url, body, proxy=proxies["suite"])
        if status != 200:
            out["error"] = f"suite answered {status}: {resp[:300]!r}"
            return out
        out["suite_masks"] = b"[EMAIL_" in resp and b"@" not in resp.split(b"[EMAIL_")[0][-40:]
        samples: dict[str, list[float]] = {k: [] for k in proxies}
        totals: dict[str, list[float]] = {k: [] for k in proxies}
        for r in range(rounds):
            order = list(proxies)
            order = order[r % len(order):] + order[:r % len(order)]  # share load drift
            for name in order:
                res = h.ttft(url, proxy=proxies[name], n=n, body=body)
                samples[name].append(res["ttft_p50_ms"])
                totals[name].append(res["total_p50_ms"])
        for name in proxies:
            out[name] = {"ttft_p50_ms": round(statistics.median(samples[name]), 3),
                         "total_p50_ms": round(statistics.median(totals[name]), 3)}
        out["added_ttft_ms_vs_bare_sse"] = round(
            out["suite"]["ttft_p50_ms"] - out["bare-sse"]["ttft_p50_ms"], 3)
        out["masking_ttft_ms"] = round(
            out["suite"]["ttft_p50_ms"] - out["suite-nomask"]["ttft_p50_ms"], 3)
        out["added_ttft_ms_vs_bare"] = round(
            out["suite"]["ttft_p50_ms"] - out["bare"]["ttft_p50_ms"], 3)
        return out
    finally:
        for p in reversed(procs):
            p.stop()
        if issuer is not None:
            issuer.stop()


def run(quick: bool = False) -> dict[str, Any]:
    res: dict[str, Any] = {"throughput": throughput(quick)}
    res["mb_per_s_all_detectors"] = res["throughput"]["mb_per_s_all_detectors"]
    try:
        res["ttft"] = ttft(quick)
    except Exception as e:  # noqa: BLE001 - report, keep the throughput numbers
        res["ttft"] = {"error": f"{type(e).__name__}: {e}"}
    return res


def markdown(results: dict[str, Any]) -> str:
    t = results["throughput"]
    lines = [
        "## Masking",
        "",
        f"Request bodies (OpenAI chat JSON, prose with an e-mail and a phone number per "
        f"~900 bytes) masked as the gateway does it, all {t['detectors']} built-in detectors "
        "on, one core (CPU time):",
        "",
        "| body | findings | ms per body | MB/s (parse + detect + place + serialise) | "
        "detectors alone MB/s | placement overhead |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in SIZES:
        r = t[name]
        lines.append(f"| {name} | {r['findings']} | {r['ms_per_body']} | {r['mb_per_s']} | "
                     f"{r['detect_only_mb_per_s']} | {r['placement_overhead_pct']}% |")
    s = t["sse_100KB"]
    lines += ["", f"Streamed answer, 100 KB of text in {s['deltas']} deltas of 8 characters "
              f"through the incremental SSE masker: {s['ms_per_stream']} ms CPU "
              f"({s['text_mb_per_s']} MB/s of text, {s['us_per_delta']} µs per delta).", ""]
    tt = results.get("ttft") or {}
    if "error" in tt:
        lines.append(f"Time to first token: not measured ({tt['error']}).")
    else:
        lines += [
            f"Time to first token of a streamed chat completion (stand-in paces events 2 ms "
            f"apart; median of {tt['rounds']} rounds × p50 of {tt['n_per_round']} sequential "
            "requests, same run):",
            "",
            "| path | TTFT p50 ms | whole stream p50 ms |",
            "|---|---:|---:|",
            f"| bare mitmdump (no script: buffers the response) | {tt['bare']['ttft_p50_ms']} "
            f"| {tt['bare']['total_p50_ms']} |",
            f"| bare mitmdump streaming SSE (one-hook addon) | "
            f"{tt['bare-sse']['ttft_p50_ms']} | {tt['bare-sse']['total_p50_ms']} |",
            f"| suite without masking (identity, policy, recording) | "
            f"{tt['suite-nomask']['ttft_p50_ms']} | {tt['suite-nomask']['total_p50_ms']} |",
            f"| full suite (identity, policy, masking, recording) | "
            f"{tt['suite']['ttft_p50_ms']} | {tt['suite']['total_p50_ms']} |",
            "",
            f"Added time to first token by the suite: {tt['added_ttft_ms_vs_bare_sse']} ms "
            f"vs streaming bare mitmdump ({tt['masking_ttft_ms']} ms of it masking: suite "
            f"with vs without masking), {tt['added_ttft_ms_vs_bare']} ms vs bare mitmdump "
            "(which buffers the whole stream). "
            "The masker holds back only the tail a match could still extend into "
            "(`DetectorSet.holdback`: a few characters in prose), never `max_len`.",
        ]
        for note in tt.get("notes") or []:
            lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    r = run(quick=True)
    print(json.dumps(r, indent=2))
    print(markdown(r))

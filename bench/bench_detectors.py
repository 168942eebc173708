"""Detection quality on the shared corpus and detection throughput.

`run()` measures, in one process:
- precision / recall per entity on ../shared/corpus (presidio PII cases, gitleaks and
  detect-secrets secret cases), listing every case where the engine and the corpus disagree
  with the reason (KNOWN_DISAGREEMENTS; tests/masking/test_corpus.py asserts the exact list),
- `DetectorSet.find` throughput in MB/s on one core for 1 KB, 100 KB and 1 MB of prose-like
  text with all detectors on (ASCII prose, and the same prose with non-ASCII words).

Scoring: a PII case lists expected spans; a finding of the case's entity that overlaps an
expected span is a true positive (one per expected span), the others are false positives;
expected spans with no finding are false negatives. Cases without spans compare counts. A
secret case with should_match counts one true positive when at least one finding of its
entity exists; findings of the entity in a should_match=false case are false positives.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

from addons.masking.detectors import DetectorSet

CORPUS_DIR = Path(os.environ.get("AGENTGATE_CORPUS",
                                  Path(__file__).resolve().parents[2] / "shared" / "corpus"))

PII_ENTITY = {"CREDIT_CARD": "CREDIT_CARD", "US_SSN": "US_SSN", "EMAIL_ADDRESS": "EMAIL",
              "PHONE_NUMBER": "PHONE", "IBAN_CODE": "IBAN", "IP_ADDRESS": "IP_ADDRESS"}
SECRET_ENTITY = {
    "openai_api_key": "OPENAI_KEY", "anthropic_api_key": "ANTHROPIC_KEY",
    "anthropic_admin_api_key": "ANTHROPIC_ADMIN_KEY", "aws_access_key_id": "AWS_ACCESS_KEY",
    "aws_secret_access_key": "AWS_SECRET_KEY", "aws_bedrock_api_key": "AWS_BEDROCK_KEY",
    "github_token": "GITHUB_TOKEN", "slack_token": "SLACK_TOKEN",
    "slack_webhook_url": "SLACK_WEBHOOK", "google_api_key": "GOOGLE_API_KEY",
    "huggingface_token": "HUGGINGFACE_TOKEN", "perplexity_api_key": "PERPLEXITY_KEY",
    "private_key_pem": "PRIVATE_KEY", "jwt": "JWT", "jwt_base64": "JWT",
    "cohere_api_key": "COHERE_KEY",  # no detector: the corpus only has a negative case
}

# Every case where the engine's answer differs from the corpus, with the reason. The test
# suite asserts this exact set, so an improvement or a regression both show up.
KNOWN_DISAGREEMENTS: dict[str, str] = {
    'pii#31': (
        "'693-09.4444' mixes a dash and a dot; presidio wants one consistent separator. Mixed "
        "separators are a masking evasion (SECURITY.md, issue 11 class 7), so any single "
        "non-alphanumeric separator counts; the SSA rules still apply"),
    'pii#390': (
        "an IBAN written with slashes: presidio accepts only spaces and dashes. Any single "
        "non-alphanumeric separator is an evasion to catch (issue 11 class 7); mod-97 and the "
        "country length keep this precise"),
    'pii#20': (
        "nine bare digits with no word around them: presidio itself scores this 0.0-0.4 "
        "(below its threshold), and in code and JSON such numbers are ids, counts and "
        "timestamps ('\"id\": \"194521489\"'); a bare 9-digit SSN is found next to 'SSN', "
        "'social security', 'tax id' …, and always when written with separators"),
    'pii#19': (
        "'07805-1121' is written the way ZIP+4 codes are ('Boston, MA 02111-1307' is in every "
        "GPL header); the 5-4 grouping is not taken as an SSN. '078-051121' in the same text "
        'is found'),
    'secret#313': (
        "a PRIVATE KEY block whose body is prose ('super secret private key here'): a key body "
        'is base64; a header followed by prose or code is a mention of a key (code that tests '
        "for '-----BEGIN … PRIVATE KEY-----' must not lose its next lines). gitleaks agrees "
        '(secret#154)'),
    'secret#314': (
        "same as secret#313: a BEGIN line followed by 'yabba dabba doo'"),
    'pii#50': (
        'corpus contradicts itself: pii#51 (same text, leniency 0) expects '
        "'is415-555-0132' found; a phone number glued to a word is still a phone number, "
        'so we mask it'),
    'pii#52': (
        'corpus contradicts itself: pii#53 (same text, leniency 1) expects '
        "'91-415-555-0132' found; we mask it (country code 91 + number)"),
    'pii#54': (
        'corpus contradicts itself: pii#55/56/58 (same number, lower leniency) expect '
        "'+91 4155 550132' found; a valid +CC number is masked"),
    'pii#402': (
        "bare '::' (unspecified address, presidio scores it 0.05-0.15) is not personal "
        'data and is Haskell/C++/Python slice syntax far more often; masking it would '
        "break code. '::/0' with a prefix is still found"),
    'pii#405': (
        "same as pii#402: 'src=::' is not masked; 'dst=::1' is"),
    'pii#487': (
        "same as pii#402: a bare '::' is not masked (not personal data; code syntax)"),
    'secret#24': (
        "AKIAIOSFODNN7EXAMPLE is AWS's documented example key; we keep no 'EXAMPLE' "
        "exception because detect-secrets' matching example secret (secret#299) must be "
        'found, and masking a sample key is harmless'),
    'secret#292': (
        "AKIA + 'ZZZZ…' is a placeholder, the same shape as gitleaks' negative "
        'AKIAXXXXXXXXXXXXXXXX (secret#23); one entropy rule for all providers rejects '
        'stand-ins'),
    'secret#295': (
        "placeholder 'ZZZZ…' key id, see secret#292"),
    'secret#296': (
        "placeholder 'ZZZZ…' key id, see secret#292"),
    'secret#297': (
        "placeholder 'ZZZZ…' key id, see secret#292"),
    'secret#298': (
        "placeholder 'ZZZZ…' key id, see secret#292"),
    'secret#312': (
        "webhook URL with an all-'x' path (Txxxxxxxx/Bxxxxxxxx/xxxx…) is a placeholder; "
        'same entropy rule as secret#292'),
    'secret#233': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#234': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#235': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#236': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#237': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#238': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#239': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#240': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#241': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#242': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#243': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#244': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#245': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#246': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
    'secret#247': (
        'a well-formed, random Google API key that gitleaks allowlists by value as a '
        'known public key; a key in a prompt is still a key, we keep no per-value list '
        '(operators can add one with masking.allow)'),
}


def load_corpus(directory: Path = CORPUS_DIR) -> tuple[list[dict], list[dict]]:
    pii = json.loads((directory / "pii_cases.json").read_text(encoding="utf-8"))["cases"]
    sec = json.loads((directory / "secret_cases.json").read_text(encoding="utf-8"))["cases"]
    return pii, sec


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def evaluate(ds: DetectorSet | None = None, directory: Path = CORPUS_DIR) -> dict[str, Any]:
    """Score the detectors on the corpus. Returns per-entity counts and the disagreements."""
    ds = ds or DetectorSet()
    pii, sec = load_corpus(directory)
    stats: dict[str, dict[str, int]] = {}
    disagreements: dict[str, str] = {}
    span_diffs: dict[str, str] = {}
    cross: dict[str, list[str]] = {}

    def add(entity: str, tp: int, fp: int, fn: int) -> None:
        s = stats.setdefault(entity, {"tp": 0, "fp": 0, "fn": 0, "cases": 0})
        s["tp"] += tp
        s["fp"] += fp
        s["fn"] += fn
        s["cases"] += 1

    for i, case in enumerate(pii):
        cid = f"pii#{i}"
        entity = PII_ENTITY[case["entity"]]
        found = ds.find(case["text"])
        mine = [(f.start, f.end) for f in found if f.entity == entity]
        others = sorted({f.entity for f in found if f.entity != entity})
        if others:
            cross[cid] = others
        spans = case.get("expected_spans")
        if spans is None:
            exp = case["expected_count"]
            tp, fp, fn = min(exp, len(mine)), max(0, len(mine) - exp), max(0, exp - len(mine))
        else:
            exp_spans = [tuple(s) for s in spans]
            matched = [any(_overlaps(e, m) for m in mine) for e in exp_spans]
            tp = sum(matched)
            fn = len(exp_spans) - tp
            fp = sum(1 for m in mine if not any(_overlaps(e, m) for e in exp_spans))
            if tp and set(mine) != set(exp_spans) and not fp:
                span_diffs[cid] = f"expected {sorted(exp_spans)}, found {sorted(mine)}"
        add(entity, tp, fp, fn)
        if fp or fn:
            disagreements[cid] = f"{entity}: fp={fp} fn={fn} text={case['text'][:70]!r}"

    for i, case in enumerate(sec):
        cid = f"secret#{i}"
        entity = SECRET_ENTITY[case["kind"]]
        found = ds.find(case["text"])
        n = sum(1 for f in found if f.entity == entity)
        others = sorted({f.entity for f in found if f.entity != entity})
        if others:
            cross[cid] = others
        if case["should_match"]:
            tp, fn, fp = (1, 0, n - 1) if n else (0, 1, 0)
        else:
            tp, fn, fp = 0, 0, n
        add(entity, tp, fp, fn)
        if fp or fn:
            disagreements[cid] = f"{entity}: fp={fp} fn={fn} text={case['text'][:70]!r}"

    for s in stats.values():
        s["precision"] = s["tp"] / (s["tp"] + s["fp"]) if s["tp"] + s["fp"] else 1.0
        s["recall"] = s["tp"] / (s["tp"] + s["fn"]) if s["tp"] + s["fn"] else 1.0
    return {"stats": stats, "disagreements": disagreements, "span_diffs": span_diffs,
            "cross": cross, "cases": len(pii) + len(sec)}


# ---------------------------------------------------------------------------- throughput
_WORDS = ("the of and to in is that for it as with was on be by this are from or at an "
          "have not but all can which their will one would there what about more when up "
          "model agent request response gateway token policy review summary customer "
          "order invoice shipping address meeting project release version update data "
          "report analysis please thanks regards team schedule budget quarter note").split()
_EXTRA = ("Note:", "e.g.", "version 2.4.1", "3 items", "at 10:30", "(see above)", "50%",
          "https://example.com/docs/page", "ID 48213", "2024-06-01", "v1.2", "x=42;")


def prose(n_chars: int, seed: int = 7, non_ascii: bool = False) -> str:
    """Deterministic English-like text with the odd number, URL, time and punctuation."""
    rnd = random.Random(seed)
    out: list[str] = []
    size = 0
    accents = ("café", "naïve", "Zürich", "résumé", "—", "“quoted”", "日本語", "😀")
    while size < n_chars:
        k = rnd.randint(6, 18)
        words = [rnd.choice(_WORDS) for _ in range(k)]
        if rnd.random() < 0.3:
            words.insert(rnd.randrange(k), rnd.choice(_EXTRA))
        if non_ascii and rnd.random() < 0.3:
            words.insert(rnd.randrange(k), rnd.choice(accents))
        s = " ".join(words).capitalize() + rnd.choice((". ", ". ", "? ", "! ", ".\n"))
        out.append(s)
        size += len(s)
    return "".join(out)[:n_chars]


def _throughput(ds: DetectorSet, text: str, min_seconds: float) -> float:
    """MB of UTF-8 input per CPU-second of this process (one core; CPU time rather than wall
    time so that other processes on a shared machine do not distort it)."""
    ds.find(text)  # warm-up
    n = 0
    t0 = time.process_time()
    while True:
        ds.find(text)
        n += 1
        dt = time.process_time() - t0
        if dt >= min_seconds:
            break
    return len(text.encode("utf-8")) * n / dt / 1e6


def run(quick: bool = False) -> dict[str, Any]:
    ds = DetectorSet()  # the fast engine (Hyperscan prefilter) when hyperscan is importable
    ref = DetectorSet(fast=False)  # the reference engine, measured beside it
    t0 = time.perf_counter()
    quality = evaluate(ds)
    quality["seconds"] = time.perf_counter() - t0
    quality["fast_engine"] = ds.fast
    quality["reference_agrees"] = evaluate(ref) == {k: v for k, v in quality.items()
                                                    if k not in ("seconds", "fast_engine")}
    sizes = {"1 KB": 1_000, "100 KB": 100_000, "1 MB": 1_000_000}
    min_s = 0.2 if quick else 1.0
    speed: dict[str, dict[str, float]] = {}
    speed_ref: dict[str, dict[str, float]] = {}
    for label, n in sizes.items():
        speed[label] = {
            "ascii": _throughput(ds, prose(n), min_s),
            "non_ascii": _throughput(ds, prose(n, non_ascii=True), min_s),
        }
        speed_ref[label] = {
            "ascii": _throughput(ref, prose(n), min_s),
            "non_ascii": _throughput(ref, prose(n, non_ascii=True), min_s),
        }
    # a dense case: one finding per ~200 chars
    dense = prose(100_000, seed=3)
    pieces = [dense[i:i + 200] for i in range(0, len(dense), 200)]
    fillers = ("jane.doe@example.com", "4111 1111 1111 1111", "+1 415 555 0132",
               "078-05-1123", "10.1.2.3", "ghp_5ytzwHhANLUH8nLYuJoEoxq0bUfEJ0dpayuX")
    dense = " ".join(p + " " + fillers[i % len(fillers)] for i, p in enumerate(pieces))
    speed["100 KB dense"] = {"ascii": _throughput(ds, dense, min_s),
                             "findings": float(len(ds.find(dense)))}
    speed_ref["100 KB dense"] = {"ascii": _throughput(ref, dense, min_s)}
    # hostile 100 KB bodies an agent could send to make masking slow: all must stay linear
    hostile = {
        "'1 1 1 …'": "1 " * 50_000, "'1.1.1.1.…'": "1." * 50_000,
        "'1' + ZWSP, repeated": "1\u200b" * 50_000, "'1::1::…'": "1::" * 33_333,
        "'a@a@…'": "a@" * 50_000, "full-width digits": "１" * 100_000,
        "'%41' escapes": "%41" * 33_333, "'aws ' repeated": "aws " * 25_000,
        "BEGIN PRIVATE KEY lines": ("-----BEGIN " "PRIVATE KEY-----\n") * 3_571,
    }
    worst = {label: _throughput(ds, text, min_s / 2) for label, text in hostile.items()}
    worst_ref = {label: _throughput(ref, text, min_s / 2) for label, text in hostile.items()}
    # the headline number: the slowest ASCII prose size
    headline = min(speed[k]["ascii"] for k in sizes)
    return {"quality": quality, "speed": speed, "hostile": worst,
            "reference": {"speed": speed_ref, "hostile": worst_ref},
            "mb_per_s_all_detectors": headline}


def markdown(results: dict[str, Any]) -> str:
    q = results["quality"]
    lines = ["## Masking: detection quality and speed", "",
             f"Corpus: `../shared/corpus` ({q['cases']} cases: presidio PII, gitleaks and "
             "detect-secrets secrets), scored by `bench/bench_detectors.py`.", "",
             "| entity | cases | TP | FP | FN | precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for entity, s in sorted(q["stats"].items()):
        lines.append(f"| {entity} | {s['cases']} | {s['tp']} | {s['fp']} | {s['fn']} | "
                     f"{s['precision']:.3f} | {s['recall']:.3f} |")
    tot = {k: sum(s[k] for s in q["stats"].values()) for k in ("tp", "fp", "fn")}
    p = tot["tp"] / (tot["tp"] + tot["fp"]) if tot["tp"] + tot["fp"] else 1.0
    r = tot["tp"] / (tot["tp"] + tot["fn"]) if tot["tp"] + tot["fn"] else 1.0
    lines.append(f"| **all** | {q['cases']} | {tot['tp']} | {tot['fp']} | {tot['fn']} | "
                 f"{p:.3f} | {r:.3f} |")
    lines += ["", f"Disagreements with the corpus ({len(q['disagreements'])}), each "
              "explained:", ""]
    # consecutive cases with the same outcome and reason are listed as one range
    groups: list[list[str]] = []
    for cid in sorted(q["disagreements"], key=_case_key):
        what = q["disagreements"][cid].split(" text=")[0]
        why = KNOWN_DISAGREEMENTS.get(cid, "UNEXPLAINED: " + q["disagreements"][cid])
        if groups and groups[-1][1:] == [what, why]:
            groups[-1][0] += "," + cid
        else:
            groups.append([cid, what, why])
    for ids, what, why in groups:
        ids_l = ids.split(",")
        label = f"`{ids_l[0]}`" if len(ids_l) == 1 else \
            f"`{ids_l[0]}`…`{ids_l[-1]}` ({len(ids_l)} cases)"
        lines.append(f"- {label} {what} — {why}")
    if q["span_diffs"]:
        lines += ["", "Found, but with a different span than the corpus gives:", ""]
        for cid in sorted(q["span_diffs"], key=_case_key):
            lines.append(f"- `{cid}` {q['span_diffs'][cid]}")
    rs = (results.get("reference") or {}).get("speed") or {}
    rh = (results.get("reference") or {}).get("hostile") or {}

    def r(d: dict, k: str) -> str:
        return f"{d[k]:.1f}" if k in d else "–"

    agree = q.get("reference_agrees")
    engine = "fast (Hyperscan prefilter)" if q.get("fast_engine") else "reference"
    if agree is not None:
        engine += "; the reference engine scores the corpus " + \
            ("identically" if agree else "DIFFERENTLY")
    lines += ["", f"Engine: {engine}.", "",
              "Throughput of `DetectorSet.find` (all detectors on, one core: MB of UTF-8 "
              "input per CPU-second), fast engine and reference engine (`fast=False`) in this "
              "run:", "",
              "| text | ASCII prose | reference | prose with non-ASCII words | reference |",
              "|---|---:|---:|---:|---:|"]
    for label, v in results["speed"].items():
        ref = rs.get(label, {})
        if "non_ascii" in v:
            lines.append(f"| {label} | {v['ascii']:.1f} | {r(ref, 'ascii')} | "
                         f"{v['non_ascii']:.1f} | {r(ref, 'non_ascii')} |")
        else:
            lines.append(f"| {label} ({int(v['findings'])} findings) | {v['ascii']:.1f} | "
                         f"{r(ref, 'ascii')} | – | – |")
    if results.get("hostile"):
        lines += ["", "Hostile 100 KB inputs (made to slow a regex engine down; MB/s, same "
                  "measure): every detector stays linear, the slowest case bounds the CPU "
                  "time a 16 MiB body can cost.", "", "| input | MB/s | reference |",
                  "|---|---:|---:|"]
        for label, v in results["hostile"].items():
            lines.append(f"| {label} | {v:.1f} | {r(rh, label)} |")
    return "\n".join(lines) + "\n"


def _case_key(cid: str) -> tuple[str, int]:
    kind, n = cid.split("#")
    return kind, int(n)


if __name__ == "__main__":
    import sys
    print(markdown(run(quick="--quick" in sys.argv)))

"""masking/cost.py's estimate against the real masking CPU, detector by detector.

For every detector (each built-in entity, each secret rule's shape, and a custom detector
from rules) a body is crafted of one repeated unit: real values of it (findings), or what
triggers its work without being one (a look-alike, its keyword, its operator). Each body
is masked whole as a chat request (masking/bodies.Masked, the real DetectorSet with the
Hyperscan prefilter, a custom detector as rules add one), best CPU time of 3.

Reported per body: units in 64 KB, findings, CPU ms, the estimate (uncapped) in ms, the
ratio measured/estimate, and the largest prefix the estimate keeps on the event loop
(estimate <= LOOP_BUDGET_US) with its measured CPU — the worst of those is the longest a
crafted body of one kind holds the loop (the target: ~2 ms).

`python -m bench.bench_cost [--size 65536] [--only NAME ...]`
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import string
import time
from collections.abc import Callable

from addons.masking import cost
from addons.masking.bodies import Masked
from addons.masking.config import CustomDetector, MaskingConfig
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session

Unit = Callable[[random.Random], str]

# the custom detector the sweep adds, as a rules file would (letters only: none of the
# bytes the built-ins' estimate counts)
CUSTOM = CustomDetector(name="ACCT_REF", pattern=r"acct[a-z]{6}")
CUSTOM_CI = CustomDetector(name="REF_CODE", pattern=r"ref[a-z]{4}q", ignore_case=True)

_ALNUM = string.ascii_letters + string.digits
_B64 = _ALNUM + "+/"


def _r(rnd: random.Random, n: int, chars: str = _ALNUM) -> str:
    return "".join(rnd.choice(chars) for _ in range(n))


def _luhn(prefix: str, n: int, rnd: random.Random) -> str:
    body = prefix + "".join(rnd.choice(string.digits) for _ in range(n - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return body + str((10 - total % 10) % 10)


def _iban(rnd: random.Random) -> str:
    bban = "".join(rnd.choice(string.digits) for _ in range(18))
    num = "".join(str(int(c, 36)) for c in bban + "DE00")
    check = 98 - int(num) % 97
    return f"DE{check:02d}{bban}"


def _jwt(rnd: random.Random) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64({'sub': _r(rnd, 12)})}.{_r(rnd, 43)}"


def _pem(rnd: random.Random) -> str:
    lines = "\n".join(_r(rnd, 64, _B64) for _ in range(4))
    return f"-----BEGIN RSA PRIVATE KEY-----\n{lines}\n-----END RSA PRIVATE KEY-----\n"


# (entity the body's findings are of, or None: triggers only) -> unit
FINDINGS: dict[str, tuple[str, Unit]] = {
    "email": ("EMAIL", lambda r: f"{_r(r, 8).lower()}.x@example.com "),
    "phone-nanp": ("PHONE", lambda r: f"call ({r.randint(201, 989)}) {r.randint(201, 989)}-"
                                      f"{r.randint(1000, 9999)} "),
    "phone-intl": ("PHONE", lambda r: f"+44 20 {r.randint(1000, 9999)} {r.randint(1000, 9999)} "),
    "ssn": ("US_SSN", lambda r: f"ssn {r.randint(100, 665)}-{r.randint(10, 99)}-"
                                f"{r.randint(1000, 9999)} "),
    "card": ("CREDIT_CARD", lambda r: _luhn("4", 16, r) + " "),
    "iban": ("IBAN", lambda r: _iban(r) + " "),
    "ipv4": ("IP_ADDRESS", lambda r: f"10.{r.randint(0, 255)}.{r.randint(0, 255)}."
                                     f"{r.randint(1, 254)} "),
    "ipv6": ("IP_ADDRESS", lambda r: f"2001:db8:{r.randint(1, 65535):x}::{r.randint(1, 65535):x} "),
    "openai": ("OPENAI_KEY", lambda r: f"sk-proj-{_r(r, 20)}T3BlbkFJ{_r(r, 20)} "),
    "anthropic": ("ANTHROPIC_KEY", lambda r: f"sk-ant-api03-{_r(r, 93)}AA "),
    "anthropic-admin": ("ANTHROPIC_ADMIN_KEY", lambda r: f"sk-ant-admin01-{_r(r, 93)}AA "),
    "aws-access": ("AWS_ACCESS_KEY",
                   lambda r: "AKIA" + _r(r, 16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") + " "),
    "aws-secret": ("AWS_SECRET_KEY",
                   lambda r: f"aws secret {_r(r, 30)}{_r(r, 10, string.digits)} "),
    "bedrock": ("AWS_BEDROCK_KEY", lambda r: f"ABSKQmVkcm9ja0FQSUtleS{_r(r, 122, _B64)} "),
    "github": ("GITHUB_TOKEN", lambda r: f"ghp_{_r(r, 36)} "),
    "slack-token": ("SLACK_TOKEN", lambda r: f"xoxb-{r.randint(10**11, 10**12 - 1)}-"
                                             f"{r.randint(10**11, 10**12 - 1)}-{_r(r, 24)} "),
    "slack-webhook": ("SLACK_WEBHOOK", lambda r: f"https://hooks.slack.com/services/{_r(r, 9)}/"
                                                 f"{_r(r, 11)}/{_r(r, 24)} "),
    "google": ("GOOGLE_API_KEY", lambda r: f"AIza{_r(r, 35)} "),
    "huggingface": ("HUGGINGFACE_TOKEN", lambda r: f"hf_{_r(r, 34, string.ascii_letters)} "),
    "perplexity": ("PERPLEXITY_KEY", lambda r: f"pplx-{_r(r, 48)} "),
    "private-key": ("PRIVATE_KEY", _pem),
    "jwt": ("JWT", lambda r: _jwt(r) + " "),
    "stripe": ("STRIPE_KEY", lambda r: f"sk_live_{_r(r, 24)} "),
    "gitlab": ("GITLAB_TOKEN", lambda r: f"glpat-{_r(r, 20)} "),
    "npm": ("NPM_TOKEN", lambda r: f"npm_{_r(r, 36)} "),
    "pypi": ("PYPI_TOKEN", lambda r: f"pypi-Ag{_r(r, 60)} "),
    "sendgrid": ("SENDGRID_KEY", lambda r: f"SG.{_r(r, 22)}.{_r(r, 43)} "),
    "bearer": ("BEARER_TOKEN", lambda r: f"Bearer {_r(r, 32)} "),
    "password-assign": ("PASSWORD", lambda r: f'password="{_r(r, 10)}" '),
    "password-url": ("PASSWORD", lambda r: f"https://user:{_r(r, 10)}@db.example.net "),
    "custom": ("ACCT_REF", lambda r: f"acct{_r(r, 6, string.ascii_lowercase)} "),
    "custom-ci": ("REF_CODE", lambda r: f"REF{_r(r, 4, string.ascii_uppercase)}Q "),
}
TRIGGERS: dict[str, Unit] = {
    "passwd-runs": lambda r: "passwd: x ",
    "token-op": lambda r: "token: x ",
    "key-op": lambda r: "key=v ",
    "credential-op": lambda r: "credential: x ",
    "bearer-word": lambda r: "bearer x ",
    "aws-words": lambda r: "aws secret ",
    "eyJ-lookalike": lambda r: "eyJhbGciOi. ",
    "eyj-lower": lambda r: f"eyj{_r(r, 12).lower()}.{_r(r, 8).lower()} ",
    "ipv6-like": lambda r: "a:b:c ",
    "double-colon": lambda r: "::",
    "iban-lower": lambda r: " de12",
    "digits": lambda r: "1 ",
    "times": lambda r: "12:30 ",
    "at-signs": lambda r: "@ ",
    "pct-escapes": lambda r: "%41",
    "u-escapes": lambda r: "\\u0041",
    "entities": lambda r: "&#65;",
    "non-ascii": lambda r: "é",
    "url-colon": lambda r: "://u: ",
    "custom-near": lambda r: "acct-x ",
}

# CPU us per unit of each 64 KB body, best of 3 (this machine, 2026-12-02 09:48 UTC, load
# average 1.4-2.0, python -m bench.bench_cost): what tests/masking/test_cost_sweep.py
# holds the estimate to, per unit counted. Re-measure after a detector changes.
MEASURED_US_PER_UNIT: dict[str, float] = {
    "email": 6.66,
    "phone-nanp": 8.59,
    "phone-intl": 7.78,
    "ssn": 8.47,
    "card": 11.26,
    "iban": 18.33,
    "ipv4": 12.17,
    "ipv6": 11.37,
    "openai": 16.53,
    "anthropic": 22.38,
    "anthropic-admin": 22.31,
    "aws-access": 10.70,
    "aws-secret": 21.09,
    "bedrock": 25.41,
    "github": 15.22,
    "slack-token": 23.58,
    "slack-webhook": 16.87,
    "google": 14.27,
    "huggingface": 14.86,
    "perplexity": 15.83,
    "private-key": 20.45,
    "jwt": 11.34,
    "stripe": 13.25,
    "gitlab": 11.47,
    "npm": 14.02,
    "pypi": 17.55,
    "sendgrid": 18.58,
    "bearer": 17.67,
    "password-assign": 11.53,
    "password-url": 14.84,
    "custom": 5.04,
    "custom-ci": 5.06,
    "passwd-runs": 1.16,
    "token-op": 1.09,
    "key-op": 0.73,
    "credential-op": 1.34,
    "bearer-word": 0.55,
    "aws-words": 1.19,
    "eyJ-lookalike": 0.20,
    "eyj-lower": 0.23,
    "ipv6-like": 3.32,
    "double-colon": 0.27,
    "iban-lower": 6.49,
    "digits": 0.53,
    "times": 2.77,
    "at-signs": 0.08,
    "pct-escapes": 0.84,
    "u-escapes": 0.86,
    "entities": 0.90,
    "non-ascii": 0.04,
    "url-colon": 1.52,
    "custom-near": 0.04,
}


def body_of(unit: Unit, size: int, seed: int = 0) -> tuple[str, int]:
    """(text of about `size` bytes made of units, number of units)."""
    rnd = random.Random(seed)
    parts: list[str] = []
    n = 0
    while n < size:
        u = unit(rnd)
        parts.append(u)
        n += len(u.encode())
    return "".join(parts), len(parts)


def chat(text: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()


def detectors() -> DetectorSet:
    return DetectorSet(MaskingConfig(custom=(CUSTOM, CUSTOM_CI)), fast=True)


def customs() -> tuple[cost.CustomCost, ...]:
    return tuple(cost.CustomCost(c.pattern, c.ignore_case) for c in (CUSTOM, CUSTOM_CI))


def mask_cpu(ds: DetectorSet, body: bytes, repeats: int = 3) -> float:
    """Best CPU seconds of masking `body` as a chat request (a fresh session each time)."""
    best = float("inf")
    for _ in range(repeats):
        m = Masked(Masker(ds, b"bench-key"), Session(), {}, dialect="openai")
        t0 = time.process_time()
        m.body(body, "application/json")
        best = min(best, time.process_time() - t0)
    return best


def on_loop_prefix(text: str, custom: tuple[cost.CustomCost, ...]) -> bytes:
    """The largest prefix of `text` (as a chat body) the estimate keeps on the loop."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost.estimate(chat(text[:mid]), custom) <= cost.LOOP_BUDGET_US:
            lo = mid
        else:
            hi = mid - 1
    return chat(text[:lo])


def run(size: int = 65536, only: list[str] | None = None) -> list[dict]:
    ds = detectors()
    custom = customs()
    rows = []
    cases: list[tuple[str, str | None, Unit]] = \
        [(n, e, u) for n, (e, u) in FINDINGS.items()] + [(n, None, u) for n, u in TRIGGERS.items()]
    for name, entity, unit in cases:
        if only and name not in only:
            continue
        text, units = body_of(unit, size)
        body = chat(text)
        found = [f for f in ds.find(text) if entity is None or f.entity == entity]
        cpu = mask_cpu(ds, body)
        est = cost.estimate(body, custom, limit=1 << 62)
        prefix = on_loop_prefix(text, custom)
        rows.append({"name": name, "entity": entity, "units": units, "findings": len(found),
                     "cpu_ms": cpu * 1e3, "est_ms": est / 1e3,
                     "ratio": cpu * 1e6 / max(1, est), "us_per_unit": cpu * 1e6 / units,
                     "loop_bytes": len(prefix), "loop_ms": mask_cpu(ds, prefix) * 1e3})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    rows = run(args.size, args.only)
    print(f"{'body':18} {'units':>6} {'found':>6} {'cpu ms':>8} {'est ms':>8} {'cpu/est':>7} "
          f"{'us/unit':>8} {'on-loop bytes':>13} {'its cpu ms':>10}")
    for r in rows:
        print(f"{r['name']:18} {r['units']:6} {r['findings']:6} {r['cpu_ms']:8.2f} "
              f"{r['est_ms']:8.2f} {r['ratio']:7.2f} {r['us_per_unit']:8.2f} "
              f"{r['loop_bytes']:13} {r['loop_ms']:10.2f}")
    worst = max(rows, key=lambda r: r["loop_ms"])
    print(f"longest on the loop: {worst['name']} {worst['loop_ms']:.2f} ms "
          f"({worst['loop_bytes']} bytes); budget {cost.LOOP_BUDGET_US / 1e3:.1f} ms")


if __name__ == "__main__":
    main()

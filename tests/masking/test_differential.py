"""The fast engine (Hyperscan prefilter, addons/masking/fastscan.py) finds exactly what the
reference engine (`DetectorSet(fast=False)`) finds: same entities, spans and values.

Inputs: the shared corpus, every string literal of the masking and hostile test modules (the
evasion cases other people wrote: Unicode digits, zero-width characters, escapes, separators),
each alone, inside long prose (the long-text paths) and glued together, evasion variants of
every sample, and random text from hypothesis (derandomised) built from the pieces the
detectors care about.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking import fastscan
from addons.masking.config import CustomDetector, MaskingConfig
from addons.masking.detectors import CONTEXT_SAMPLES, SAMPLES, DetectorSet
from bench.bench_detectors import CORPUS_DIR, prose

pytestmark = pytest.mark.skipif(not fastscan.AVAILABLE, reason="hyperscan not importable")

FAST = DetectorSet(fast=True)
REF = DetectorSet(fast=False)
ROOT = Path(__file__).resolve().parents[2]
PAD = prose(20_000, seed=11)  # past _SHORT_TEXT: the reference's long-text path


def same(text: str, fast: DetectorSet = FAST, ref: DetectorSet = REF) -> None:
    got, want = fast.find(text), ref.find(text)
    assert got == want, f"fast {got!r} != reference {want!r} for {text[:200]!r}"


def test_fast_engine_is_in_use():
    assert FAST.fast and not REF.fast


def _corpus_texts() -> list[str]:
    out = []
    for name in ("pii_cases.json", "secret_cases.json"):
        cases = json.loads((CORPUS_DIR / name).read_text(encoding="utf-8"))["cases"]
        out.extend(c["text"] for c in cases)
    return out


def _test_literals() -> list[str]:
    """Every string constant of the masking and hostile test modules (their evasions)."""
    out: set[str] = set()
    for d in ("tests/masking", "tests/hostile"):
        for f in sorted((ROOT / d).glob("test_*.py")):
            if f.name == Path(__file__).name:
                continue
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and 3 <= len(node.value) <= 20_000:
                    out.add(node.value)
    return sorted(out)


CORPUS = _corpus_texts()
LITERALS = _test_literals()


def test_corpus_alone_and_in_long_prose():
    assert len(CORPUS) > 500
    for text in CORPUS:
        same(text)
    # the long-text paths, with each case at a different offset
    for i in range(0, len(CORPUS), 40):
        same(PAD[: 997 * (i % 7)] + "\n".join(CORPUS[i:i + 40]) + PAD)


def test_test_suite_literals_alone_and_glued():
    assert len(LITERALS) > 300
    for text in LITERALS:
        same(text)
    for i in range(0, len(LITERALS), 25):
        chunk = LITERALS[i:i + 25]
        same(" ".join(chunk))
        same("".join(chunk))
        same(PAD[:18_000] + " ".join(chunk))


ZW = ("\u200b", "\u200c", "\u2060", "\ufeff", "\u00ad")


def _evasions(value: str) -> list[str]:
    full = "".join(chr(0xFF10 + int(c)) if c.isdigit() else c for c in value)
    arabic = "".join(chr(0x0660 + int(c)) if c.isdigit() else c for c in value)
    zw = ZW[len(value) % len(ZW)].join(value)
    uesc = "".join(f"\\u{ord(c):04x}" if c.isdigit() else c for c in value)
    pct = "".join(f"%{ord(c):02X}" if c.isalnum() else c for c in value)
    html = "".join(f"&#{ord(c)};" if c.isdigit() else c for c in value)
    return [value, full, arabic, zw, uesc, pct, html, value.lower(), value.upper()]


def test_sample_evasions():
    values = list(SAMPLES.values()) + [t for t, _ in CONTEXT_SAMPLES.values()]
    for v in values:
        for e in _evasions(v):
            for text in (e, f"see {e}.", f'{{"x": "{e}"}}', PAD[:17_000] + " " + e + " ok"):
                same(text)


# random text from the pieces that start, extend, break or validate a detection
PIECES = st.sampled_from([
    "4111", "1111", "0132", "415", "555", "+1", "+44", "(20)", "078", "05", "1123", "DE89",
    "3704", "0044", "gb82", "WEST", "12345698765432", "jane.doe", "@", "example.com", ".",
    "-", " ", "  ", "\n", "\r\n", "/", "_", ",", ":", "::", "=", '"', "'", "#", "%41",
    "\\u0034", "&#52;", "\u200b", "\uff14", "\u0664", "é", "日本", "\u2212", "aws", "secret",
    "SECRET", "password", "Password=", "token: ", "Bearer ", "bearer", "://", "user:",
    "https", "sk-", "sk-proj-", "T3BlbkFJ", "AKIA", "ghp_", "hf_", "xoxb-", "AIza", "eyJ",
    "-----BEGIN ", "PRIVATE KEY-----", "glpat-", "npm_", "pypi-Ag", "SG.", "pplx-", "rk_",
    "live_", "10.1.2.3", "192.168", "fe80", "::1", "2001:db8", "SSN", "phone", "call",
    "social security", "abcdefghijKLMNOP", "Zq9xW2", "0", "1", "7", "9", "12", "x",
] + list(SAMPLES.values()) + [t for t, _ in CONTEXT_SAMPLES.values()])
PROFILE = settings(max_examples=600, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROFILE
@given(st.lists(PIECES, max_size=40), st.integers(0, 3))
def test_random_texts(pieces: list[str], pad: int):
    text = "".join(pieces)
    same(text)
    if pad:
        same(PAD[: 6_000 * pad] + text + PAD[:100])


@PROFILE
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
               max_size=200))
def test_random_unicode(text: str):
    same(text)
    same("1 " + text + " 4111 1111 1111 1111 " + text)


def test_custom_detectors_and_allow_list():
    cfg = MaskingConfig(custom=(
        CustomDetector("EMPLOYEE_ID", r"EMP-\d{6}"),
        CustomDetector("ACCOUNT", r"\b\d{8}\b", validator="luhn", context=("account",))),
        allow=(r"[a-z.]+@example\.org",))
    fast, ref = DetectorSet(cfg, fast=True), DetectorSet(cfg, fast=False)
    assert fast.fast
    for text in ("EMP-123456 and account 79927398713? account 12345674",
                 "ann@example.org jane.doe@example.com EMP-000001",
                 PAD[:17_000] + " account no 12345674 EMP-654321"):
        same(text, fast, ref)
        assert fast.find(text)


def test_hyperscan_iban_window_reaches_the_longest_iban():
    # the grouped form with two-character separators is the longest: it must fit the window
    text = "x MT84\r\nMALT\r\n0110\r\n0001\r\n2345\r\nMTLC\r\nAST0\r\n01S y"
    got = FAST.find(text + PAD)
    assert [f.entity for f in got][:1] == ["IBAN"]
    assert got[0].end - got[0].start < fastscan.IBAN_WINDOW
    same(text + PAD)
    same(PAD + text)


def test_a_wrong_anchor_is_caught(monkeypatch):
    """The differential checks can fail: a prefilter missing the '@' anchor loses e-mails."""
    monkeypatch.setitem(fastscan.PRESENCE_ANCHORS, "email", (rb"@@@",))
    monkeypatch.setattr(fastscan, "_CACHE", {})  # compile the broken anchors
    broken = DetectorSet(MaskingConfig(), fast=True)
    with pytest.raises(AssertionError):
        same("mail jane.doe@example.com now", broken, REF)


# the windowed paths: 9-digit clusters found from one digit, password operators, IPv4
# triggers, IBAN starts — random runs of their pieces, at the start, middle and end of text
DIGITS = st.sampled_from([
    "0", "1", "2", "4", "5", "9", "41", "415", "4111", "078", "0532", " ", "-", ".", "_",
    "/", ",", "\r\n", "\n", "é", "\u2022", "\u00b7", "a", "Z", ":", "(", ")", "+", "  ",
    "   ", "    ", "#", "DE", "gb", "ab", "SSN ", "call ", "+44 ", "+1 ", "(20) ", "(415) ",
    "10.", "192.168.", "1.2"])
ASSIGN = st.sampled_from([
    "PASSWORD", "password", "Passphrase", "pwd", "SECRET", "token", "api_key", "API-KEY",
    "apikey", "access_key", "PRIVATE_KEY", "credentials", "db_", "export ", "2", "12", '"',
    "'", "`", " ", "\t", "   ", "=", ":", "==", ":=", "=>", "\n", "\r\n", "x9!kQ2#zLm",
    "S3cr3t-Pa55w0rd", "${VAR}", "changeme", "abc", "#", "key:", "pass=", "é",
    '"password": "', "'token': '", '{"db_pass":"', "PASSWORD = ", "secret2 :  ", '"',
    "credent\u0130al", "CREDENT\u0130ALS", "\u0130", "\u0131", "\u017f", "\u212a"])


@PROFILE
@given(st.lists(st.one_of(DIGITS, ASSIGN), max_size=120), st.integers(0, 2))
def test_random_windowed_paths(pieces: list[str], where: int):
    text = "".join(pieces)
    same(text)
    pad = PAD[:17_000]
    same((pad + text, text + pad, pad + text + pad)[where])


@pytest.mark.parametrize("word", ["credent\u0130al", "CREDENT\u0130AL", "pa\u017f\u017f",
                                  "to\u212aen", "api_\u212aey"])
def test_unicode_case_folding_in_password_words(word: str):
    """The assignments' (?i) matches 'İ' (U+0130) for 'i'; 'ſ' and the Kelvin sign are
    folded to ASCII by normalize. The prefilter's anchors must let all of them through."""
    for text in (f'db_{word}: "S3cr3t-Pa55w0rd"', f'{word}="S3cr3t-Pa55w0rd"',
                 PAD + f' {word}="S3cr3t-Pa55w0rd"'):
        same(text)
    assert REF.find(f'db_{word}: "S3cr3t-Pa55w0rd"')


# overlap resolution: the shortcut for candidates whose different spans are all disjoint
# must pick what the general resolution picks (longest, then priority, then first found)
CANDIDATE = st.tuples(st.integers(0, 60), st.integers(0, 12),
                      st.sampled_from(["PHONE", "US_SSN", "CREDIT_CARD", "EMAIL", "JWT"]),
                      st.sampled_from([15, 30, 40, 50, 80])).map(
    lambda c: (c[0], c[0] + c[1], c[2], c[3]))


@PROFILE
@given(st.lists(CANDIDATE, max_size=30), st.booleans())
def test_resolution_shortcut_is_the_general_resolution(cands, spread):
    from addons.masking import detectors as D

    if spread:  # mostly disjoint spans (the usual case), duplicates included
        cands = [(s * 20, s * 20 + max(n, 1), ent, p) for s, e, ent, p in cands
                 for n in [e - s]] + cands[:3]
    want = D._resolve_overlapping(list(cands))
    fast = D._resolve_disjoint(list(cands))
    if fast is not None:
        assert fast == want
    assert D._resolve(list(cands)) == want


def test_resolution_shortcut_is_taken_for_disjoint_spans():
    from addons.masking import detectors as D

    cands = [(10, 20, "PHONE", 30), (0, 5, "EMAIL", 35), (10, 20, "PHONE", 30),
             (10, 20, "US_SSN", 40), (20, 25, "JWT", 80)]
    assert D._resolve_disjoint(cands) == [(0, 5, "EMAIL"), (10, 20, "US_SSN"),
                                          (20, 25, "JWT")]
    assert D._resolve_disjoint(cands + [(4, 6, "PHONE", 30)]) is None


# e-mail addresses on ASCII text: `re` on the domain and the reversed bytes for the local
# part (fast engine) against the look-behind capture of _EMAIL (reference)
EMAIL_PIECES = st.sampled_from([
    "jane.doe", "j", ".", "..", "_", "%", "+", "-", "x" * 30, "y" * 35, "@", "@@", "example",
    "com", ".com", ".c", "xn--bcher-kva", ".xn--p1ai", "sub-", "-a", "a-", "1", "42", " ",
    "\n", ":", "://", "https", "user:", "mailto:", ",", ";", "(", ")", "<", ">", '"', "'",
    "#", "/", "?", "=", "e", "ABC", "a" * 63,
])


LOCAL = st.lists(st.sampled_from(["jane", "doe", ".", "_", "%", "+", "-", "x" * 30, "y" * 35,
                                   "1", "a" * 63, "Q"]), min_size=1, max_size=4).map("".join)
LABEL = st.sampled_from(["example", "a", "sub-domain", "-bad", "bad-", "x1", "_u", "b" * 61,
                         "c" * 62, "1"])
TLD = st.sampled_from(["com", "org", "c", "co", "xn--p1ai", "xn--", "c0m", "museum",
                       "d" * 63, "e" * 64])
ADDRESS = st.builds(lambda lo, labels, tld, tail: f"{lo}@{'.'.join(labels)}.{tld}{tail}",
                    LOCAL, st.lists(LABEL, min_size=1, max_size=3), TLD,
                    st.sampled_from(["", " ", ".", "-", "_", "x", ":", ">", "@b.co"]))


@PROFILE
@given(st.lists(st.one_of(EMAIL_PIECES, ADDRESS, ADDRESS), max_size=12))
def test_email_scan_on_ascii_is_the_reference_scan(pieces):
    from addons.masking import detectors as D

    t = "".join(pieces)
    want: list = []
    D._find_emails(t, want)
    got: list = []
    D._find_emails_ascii(t, t.encode("ascii")[::-1], got)
    assert got == want, t


def test_email_scan_gives_up_past_its_limit_and_takes_back_what_it_added():
    """The ASCII e-mail scan stops at the (limit+1)th '@' with `out` as it found it, so
    the caller's regex scan alone decides; within the limit it is the reference scan."""
    from addons.masking import detectors as D

    t = "a@b.co x1@y.org " * 4 + "a@a@a@"
    rev = t.encode("ascii")[::-1]
    want: list = []
    D._find_emails(t, want)
    got: list = [(0, 1, "SENTINEL", 0)]
    assert D._find_emails_ascii(t, rev, got, limit=t.count("@") - 1) is False
    assert got == [(0, 1, "SENTINEL", 0)]
    got = []
    assert D._find_emails_ascii(t, rev, got, limit=t.count("@")) is True
    assert got == want and want


@pytest.mark.parametrize("every", [2, 8, 63, 64, 65, 66, 200])
def test_email_density_threshold_either_side_same_findings(every):
    """Texts with one '@' per `every` characters (about the engine's 1-in-64 switch between
    the ASCII scan and the regex scan, from both sides): the same findings."""
    unit = ("x" * max(0, every - 12) + " u@ex.com ")[-every:]
    for n in (every * 64 - 1, every * 64, every * 64 + 1, 5000):
        same((unit * (n // len(unit) + 1))[:n])


PCT_PIECES = st.sampled_from(["%", "%%", "%4", "%41", "%4g", "%0A", "%7e", "%7F", "%20",
                               "%fF", "%G1", "%%41", "4", "1", "a", "F", "g", " ", "é", "x" * 70])


@PROFILE
@given(st.lists(PCT_PIECES, max_size=30), st.sampled_from([1, 64]))
def test_percent_units_are_the_regex_units(pieces, sparse):
    """normalize's '%XX' units by str.find are _ESC_PCT.finditer's (the regex the engine
    falls back to when '%' is dense), with the loop's density limit off and on."""
    from addons.masking import normalize as N

    t = "".join(pieces)
    want = [(m.start(), m.end(), N._unescape_pct(m)) for m in N._ESC_PCT.finditer(t)]
    old = N._PCT_SPARSE
    N._PCT_SPARSE = sparse
    try:
        got = N._pct_units(t)
    finally:
        N._PCT_SPARSE = old
    if got is None:  # too many '%' for the loop: only allowed past its limit
        assert t.count("%") > len(t) // sparse
    else:
        assert got == want, t


def test_percent_escapes_in_long_prose_found_by_both_engines():
    """A long text with a few '%XX' escapes (the loop's case) hides nothing from either
    engine: the escaped e-mail and card are found, at the same places."""
    t = ("About 50% of the 100% cases. " * 40 + "mail jane%2Edoe%40example.com and card "
         "4111%201111%201111%201111 %zz %" + " filler" * 300)
    same(t)
    assert {f.entity for f in FAST.find(t)} >= {"EMAIL", "CREDIT_CARD"}


URL_PIECES = st.sampled_from([
    "https", "postgres", "x", "://", ":/", "//", "app", "user", ":", "S3cr3t-Pa55w0rd", "p" * 70,
    "q" * 130, "@", "db.internal", "[::1]", ":5432", "/prod", "?a=1", "#f", " ", "\n", '"',
    "<", "${PW}", "***", "...", "é", "1", "-", "+", ".", "\u4e2d", "?", "\u3000", "\xa0",
    "u:"])


def _scheme_ends(t: str) -> list[int]:
    """What the prefilter's 'pw_url' anchor reports: the end of the ':' after a user part
    behind a '://'."""
    present, pos = FAST._pre.scan(fastscan.to_bytes(t))
    assert pos is not None
    return pos["pw_url"]


URL = st.builds(lambda sch, user, pw, host: f"{sch}://{user}:{pw}@{host}",
                st.sampled_from(["https", "postgres", "x", "", "1a", "a" * 22]),
                st.sampled_from(["app", "u", "", "p" * 64, "p" * 65, "a/b", "u\u4e2d",
                                 "\u4e2d" * 64, "u?x", "u\xa0v", "u\u2028v", "a b"]),
                st.sampled_from(["S3cr3t-Pa55w0rd", "Zq9!xW2#kL", "${PW}", "***", "q" * 128,
                                 "q" * 129, "x9 y", ""]),
                st.sampled_from(["db.internal:5432/prod", "[::1]", "-h", "", "h"]))


@PROFILE
@given(st.lists(st.one_of(URL_PIECES, URL, URL), max_size=12))
def test_url_passwords_at_each_scheme_are_the_finditer(pieces):
    from addons.masking import detectors as D

    t = "".join(pieces)
    want: list = []
    D._find_passwords(t, None, want, url=True, assign=False)
    got: list = []
    D._find_url_passwords(t, _scheme_ends(t), got)
    assert got == want, t


def test_url_password_at_the_longest_user_and_password():
    from addons.masking import detectors as D

    for t in ("x https://" + "p" * 64 + ":" + "aB3dE5gH7j" * 12 + "kL9mN0pQ@h y",
              "postgres://" + "u" * 64 + ":S3cr3t-Pa55w0rd@db"):
        want: list = []
        D._find_passwords(t, None, want, url=True, assign=False)
        got: list = []
        D._find_url_passwords(t, _scheme_ends(t), got)
        assert got == want and len(want) == 1, t
        assert FAST.find(t) == REF.find(t)

"""The Hyperscan prefilter (addons/masking/fastscan.py) in its corners: the fallback when the
module is missing, threads sharing one DetectorSet, texts with so many anchors that the fast
engine runs detectors everywhere, hostile inputs, and configs with entities turned off."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from addons.masking import fastscan
from addons.masking.config import BUILTIN_ENTITIES, EntityConfig, MaskingConfig
from addons.masking.detectors import SAMPLES, DetectorSet
from bench.bench_detectors import prose

pytestmark = pytest.mark.skipif(not fastscan.AVAILABLE, reason="hyperscan not importable")

ROOT = Path(__file__).resolve().parents[2]
FAST = DetectorSet(fast=True)
REF = DetectorSet(fast=False)


def same(text: str, fast: DetectorSet = FAST, ref: DetectorSet = REF) -> list:
    got = fast.find(text)
    assert got == ref.find(text), text[:120]
    return got


def test_without_hyperscan_the_reference_engine_runs_and_says_so_once():
    code = """
import logging, sys
sys.modules["hyperscan"] = None          # import hyperscan -> ImportError
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
from addons.masking.detectors import DetectorSet, SAMPLES
a, b = DetectorSet(), DetectorSet()
assert not a.fast and not b.fast
for entity, value in SAMPLES.items():
    f = a.find("x " + value + " y")
    assert [x.entity for x in f] == [entity] and f[0].value in value, (entity, f)
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"
    warnings = [ln for ln in p.stderr.splitlines() if "hyperscan is not importable" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("agentgate.masking WARNING")


def test_threads_share_one_detector_set():
    texts = [prose(30_000, seed=i) + " " + v + " " + prose(500, seed=i + 50)
             for i, v in enumerate(SAMPLES.values())]
    want = [REF.find(t) for t in texts]
    errors: list[str] = []

    def work(k: int) -> None:
        for _ in range(3):
            for i in range(k % 3, len(texts), 3):
                if FAST.find(texts[i]) != want[i]:
                    errors.append(f"text {i} in thread {k}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert all(w for w in want)


def test_too_many_numeric_anchors_runs_every_numeric_detector():
    text = "1 " * 20_000 + " card 4111 1111 1111 1111 ssn 078-05-1123 " + "2 " * 100
    data = fastscan.to_bytes(text)
    assert FAST._pre.scan(data)[1] is None  # over the limit: whole-text paths
    got = same(text)
    assert {f.entity for f in got} >= {"CREDIT_CARD", "US_SSN"}


def test_too_many_iban_candidates_scans_the_whole_text():
    text = " de12" * 12_000 + " GB82 WEST 1234 5698 7654 32 " + " fr34" * 10
    data = fastscan.to_bytes(text)
    assert FAST._pre.scan(data)[1] is None
    got = same(text)
    assert [f.value for f in got if f.entity == "IBAN"] == ["GB82 WEST 1234 5698 7654 32"]


def test_iban_windows_at_the_edges_of_the_text():
    for text in ("DE89370400440532013000", "x DE89 3704 0044 0532 0130 00",
                 "de89 3704 0044 0532 0130 00.", "ab12 DE89370400440532013000 cd34"):
        assert [f.entity for f in same(text)] == ["IBAN"], text
        same(prose(20_000) + " " + text)


@pytest.mark.parametrize("text", [
    "1 " * 50_000, "1." * 50_000, "1\u200b" * 50_000, "1::" * 33_333, "a@" * 50_000,
    "\uff11" * 100_000, "%41" * 33_333, "aws " * 25_000,
    "-----BEGIN " "PRIVATE KEY-----\n" * 3_571, "+1 " * 30_000, "0" * 100_000,
    "4111 " * 20_000, "AKIA" * 25_000, "sk-" * 30_000, "eyJ." * 25_000,
])
def test_hostile_inputs_agree(text: str):
    same(text)


@pytest.mark.parametrize("off", [("EMAIL",), ("PHONE", "CREDIT_CARD"), ("IBAN", "IP_ADDRESS"),
                                 ("PASSWORD", "BEARER_TOKEN", "AWS_SECRET_KEY"),
                                 tuple(e for e in BUILTIN_ENTITIES if e != "US_SSN")])
def test_entities_turned_off(off: tuple[str, ...]):
    cfg = MaskingConfig(entities={e: EntityConfig(enabled=False) for e in off})
    fast, ref = DetectorSet(cfg, fast=True), DetectorSet(cfg, fast=False)
    assert fast.fast
    text = " ".join(SAMPLES.values()) + " SSN 078051123 call 4155550132 Bearer " \
        "n49QVJ8ANmb4u9icuNiVGuZyJKhxgy9s password=Zq9!xW2#kL"
    for t in (text, prose(20_000) + text):
        got = same(t, fast, ref)
        assert not {f.entity for f in got} & set(off)


def test_masking_off_finds_nothing_and_builds_no_prefilter():
    ds = DetectorSet(MaskingConfig(enabled=False))
    assert not ds.fast and ds.find(SAMPLES["EMAIL"]) == []


def test_a_database_that_cannot_compile_falls_back_to_the_reference(monkeypatch, caplog):
    import hyperscan

    def refuse(exprs, flags):
        raise hyperscan.ArchitectureError("this CPU lacks the instructions")

    monkeypatch.setattr(fastscan, "_compile", refuse)
    monkeypatch.setattr(fastscan, "_CACHE", {})
    monkeypatch.setattr(fastscan, "_FAILED", set())
    monkeypatch.setattr(fastscan, "_warned", False)
    with caplog.at_level("WARNING", logger="agentgate.masking"):
        a, b = DetectorSet(), DetectorSet()
    assert not a.fast and not b.fast
    assert [f.entity for f in a.find("mail jane.doe@example.com")] == ["EMAIL"]
    warned = [r for r in caplog.records if "cannot compile" in r.getMessage()]
    assert len(warned) == 1 and "ArchitectureError" in warned[0].getMessage()


def test_on_an_event_loop_the_prefilter_compiles_in_the_background(monkeypatch):
    """The gateway builds its DetectorSet in a hook on the event loop: that must not wait
    ~0.3 s for Hyperscan. It answers at once with the reference engine (same findings) and
    switches to the prefilter when the background compilation is done."""
    import asyncio
    import time

    monkeypatch.setattr(fastscan, "_CACHE", {})
    monkeypatch.setattr(fastscan, "_PENDING", set())
    text = "call +1 415 555 0132 or mail jane.doe@example.com"

    async def build() -> tuple[DetectorSet, float, list]:
        t0 = time.perf_counter()
        ds = DetectorSet()
        took = time.perf_counter() - t0
        return ds, took, ds.find(text)

    ds, took, found = asyncio.run(build())
    assert took < 0.1, took  # compiling takes ~0.3 s; the loop did not wait for it
    assert found == REF.find(text) and len(found) == 2
    deadline = time.monotonic() + 30
    while not ds.fast and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ds.fast and ds.find(text) == found
    # off the loop the default compiles at once
    monkeypatch.setattr(fastscan, "_CACHE", {})
    assert DetectorSet().fast

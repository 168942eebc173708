"""masking/cost.py estimates the work of every detector, built-in or custom, from counts of
what triggers it — so that no body whose masking takes more than ~2 ms stays on the event
loop. Before, 64 KB of `passwd: x` (~7.6 ms here), of `token: x`, `key=v`, `bearer x`,
`aws secret`, IPv6-like `a:b:c` (~36 ms), or of a letters-only custom detector's matches
(`acct[a-z]{6}`: ~30 ms) were estimated at 0.66 ms and masked on the loop.

The sweep (bench/bench_cost.py: the bodies and the CPU measured per unit) covers every
entity the default rules enable, every secret rule, and custom detectors: for each, a
64 KB body of real findings, plus bodies of triggers that are not findings. No timing
here: the checks are on counts — the detector finds the body's values, the estimate is
over the loop's budget, and the estimate per unit is at least the CPU measured per unit
(bench_cost.MEASURED_US_PER_UNIT, re-measured with `python -m bench.bench_cost`)."""

from __future__ import annotations

import pytest

from addons.masking import cost
from addons.masking.config import CustomDetector, MaskingConfig
from addons.masking.detectors import DetectorSet
from addons.masking.secret_rules import SECRET_RULES
from bench import bench_cost as bc

SIZE = 64 * 1024


@pytest.fixture(scope="module")
def ds() -> DetectorSet:
    return bc.detectors()


def test_every_detector_has_a_body() -> None:
    """A detector added without a crafted body fails here (fix the class, not examples)."""
    covered = {entity for entity, _ in bc.FINDINGS.values()}
    enabled = set(MaskingConfig().enabled_builtins())
    assert enabled <= covered, sorted(enabled - covered)
    assert {r.entity for r in SECRET_RULES} <= covered
    assert {bc.CUSTOM.name, bc.CUSTOM_CI.name} <= covered
    assert set(bc.MEASURED_US_PER_UNIT) == set(bc.FINDINGS) | set(bc.TRIGGERS)


@pytest.mark.parametrize("name", list(bc.FINDINGS))
def test_a_body_of_findings_is_heavy_by_its_count(ds: DetectorSet, name: str) -> None:
    entity, unit = bc.FINDINGS[name]
    text, units = bc.body_of(unit, SIZE)
    found = [f for f in ds.find(text) if f.entity == entity]
    assert len(found) >= units * 0.8, (len(found), units)  # the body exercises it
    body = bc.chat(text)
    assert cost.estimate(body, bc.customs()) > cost.LOOP_BUDGET_US
    full = cost.estimate(body, bc.customs(), limit=1 << 62)
    assert full / units >= 0.9 * bc.MEASURED_US_PER_UNIT[name], (full / units, name)


@pytest.mark.parametrize("name", list(bc.TRIGGERS))
def test_a_body_of_triggers_is_heavy_by_its_count(name: str) -> None:
    text, units = bc.body_of(bc.TRIGGERS[name], SIZE)
    body = bc.chat(text)
    full = cost.estimate(body, bc.customs(), limit=1 << 62)
    assert full / units >= 0.9 * bc.MEASURED_US_PER_UNIT[name], (full / units, name)
    if bc.MEASURED_US_PER_UNIT[name] * units > cost.LOOP_BUDGET_US:
        assert cost.estimate(body, bc.customs()) > cost.LOOP_BUDGET_US


def test_plain_bodies_stay_light() -> None:
    prose = ("the order ships on friday, please check the invoice and call me back " * 1000)
    assert not cost.heavy(bc.chat(prose[:SIZE - 100]))
    assert cost.estimate(b"") == 0


@pytest.mark.parametrize("pattern,ignore_case,text,most", [
    (r"acct[a-z]{6}", False, "acctabcdef " * 100, 100),        # a literal every match holds
    (r"(?i)ref[a-z]{4}", False, "REFabcd " * 100, 100),         # inline flag: any casing
    (r"REF\d{4}", True, "ref1234 " * 100, 100),                # ignore_case: any casing
    (r"\b[A-Z]{3}[a-z]{3}\b", False, "ABCdef " * 100, 100),    # classes only: 3 capitals each
    (r"(acct|ref)-x", False, "acct-x ref-x " * 50, 100),      # alternatives: the common '-x'
    (r"\p{Lu}{4}", False, "ABCD " * 100, 260),                 # `regex`-only syntax: per byte
])
def test_custom_matches_are_bounded_by_what_each_holds(pattern: str, ignore_case: bool,
                                                      text: str, most: int) -> None:
    det = cost.CustomCost(pattern, ignore_case)
    data = text.encode()
    n = det.matches(data, data.lower())
    real = len(DetectorSet(MaskingConfig(custom=(CustomDetector(
        name="X", pattern=pattern, ignore_case=ignore_case),)), fast=False).find(text))
    assert real <= n <= most, (real, n)


def test_the_rules_custom_detectors_count_in_every_estimate() -> None:
    body = bc.chat(bc.body_of(bc.FINDINGS["custom"][1], 8192)[0])
    try:
        cost.use_custom(())
        assert not cost.heavy(body)  # letters only: nothing the built-ins count
        cost.use_custom((bc.CUSTOM,))
        assert cost.heavy(body)
    finally:
        cost.use_custom(())


@pytest.mark.parametrize("name", [n for n in bc.TRIGGERS if n not in ("custom-near",)])
def test_byte_counts_agree_with_the_scan_on_what_is_heavy(name: str) -> None:
    """Without Hyperscan the same triggers are counted from bytes: the same verdict."""
    if cost._SCANNER is None:
        pytest.skip("hyperscan not importable here")
    body = bc.chat(bc.body_of(bc.TRIGGERS[name], SIZE)[0])
    big = 1 << 62
    scanned = cost._SCANNER.count(body, 0, big)
    counted = cost._count_bytes(body, 0, big)
    assert (scanned > cost.LOOP_BUDGET_US) == (counted > cost.LOOP_BUDGET_US), (scanned, counted)
    assert 0.5 <= (counted + 1) / (scanned + 1) <= 2, (scanned, counted)

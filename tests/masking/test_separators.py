"""Separator-tolerant digit detection (issue 11, class 7): any single non-alphanumeric
separator between the groups of a card, SSN, IBAN or phone number, the same or mixed, is
caught; number lists, dates, versions and coordinates are not (validators + grouping rules
+ the isolation rule for list-like separators)."""

from __future__ import annotations

import pytest

from addons.masking.detectors import DetectorSet

DS = DetectorSet()
SEPS = [" ", "-", ".", ",", "/", "_", "\n", "\t", "\r\n", ":", "|", "\u2022", "\u00a0"]


def kinds(text: str) -> list[tuple[str, str]]:
    return [(f.entity, f.value) for f in DS.find(text)]


@pytest.mark.parametrize("sep", SEPS)
def test_card_any_consistent_separator(sep):
    card = sep.join(["4111", "1111", "1111", "1111"])
    assert kinds(f"pay with {card} now") == [("CREDIT_CARD", card)]


@pytest.mark.parametrize("seps", [(" ", "-", "."), (",", "/", "_"), ("\t", ".", "\r\n"),
                                  ("_", " ", ","), ("/", "-", "\n")])
def test_card_mixed_separators(seps):
    card = "4111" + seps[0] + "1111" + seps[1] + "1111" + seps[2] + "1111"
    assert kinds(f"card {card} ok") == [("CREDIT_CARD", card)]


@pytest.mark.parametrize("sep", SEPS)
def test_ssn_any_separator(sep):
    ssn = sep.join(["536", "22", "4519"])
    assert kinds(f"ssn {ssn} ok") == [("US_SSN", ssn)]


@pytest.mark.parametrize("ssn", ["536-22.4519", "536_22/4519", "536\n22,4519", "536 22\t4519"])
def test_ssn_mixed(ssn):
    assert kinds(f"ssn {ssn} ok") == [("US_SSN", ssn)]


@pytest.mark.parametrize("sep", SEPS)
def test_iban_any_separator(sep):
    iban = sep.join(["GB82", "WEST", "1234", "5698", "7654", "32"])
    assert kinds(f"iban {iban} ok") == [("IBAN", iban)]


def test_iban_mixed():
    iban = "DE89/3704-0044_0532,0130.00"
    assert kinds(f"IBAN: {iban}; thanks") == [("IBAN", iban)]


@pytest.mark.parametrize("phone", ["415/555/0132", "415_555_0132", "415,555,0132",
                                   "415\n555\n0132", "(415)/555_0132", "+44/20/7946/0958"])
def test_phone_separators(phone):
    assert [e for e, _ in kinds(f"call {phone} now")] == ["PHONE"]


def test_card_split_at_crlf_and_lines():
    card = "4111\r\n1111\r\n1111\r\n1111"
    assert kinds(card) == [("CREDIT_CARD", card)]


@pytest.mark.parametrize("text", [
    "2024-01-15 12:30:45", "2024/01/15", "15.01.2024", "01/15/2024 09:30",
    "version 4.11.1111.1111", "v1.2.3-rc.4 build 20240115.1234", "2024-01-15T12:30:45.123456Z",
    "lat 40.712776, lon -74.005974", "40.7128,-74.0060,10.5", "1,234,567,890.12",
    "values: 4111, 1111, 1111, 1112", "[6718,1885,8966,6125,590]",
    "[6910,2385,912,536,8086,5475,3392,2139]", "2781_736_545_8985_8502_9260",
    "4830_2313_7424_2773_8555_7430", "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]",
    "x=[0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]", "ISBN 978-3-16-148410-0",
    "sizes 1024/2048/4096/8192", "2023_12_31_23_59_59", "12:30:45.123 12:30:46.456",
    "coords: 51.5074/0.1278/35.6895/139.6917", "a,b,c\n1,2,3\n4,5,6\n7,8,9\n10,11,12",
    "1/2/3/4/5/6/7/8/9/0/1/2/3/4/5/6", "port 8080, 8443, 9000, 9090",
])
def test_lookalikes_not_found(text):
    assert [e for e, _ in kinds(text) if e in ("CREDIT_CARD", "US_SSN", "PHONE", "IBAN")] == []


def test_hostile_separator_runs_stay_fast_enough():
    # linear: a long run of single digits and mixed separators is one pass (no timing
    # assert: the result, and that it returns at all under pytest-timeout)
    text = "1,1/1_1.1-" * 20_000
    assert DS.find(text) == [] or all(f.end - f.start <= 60 for f in DS.find(text))


@pytest.mark.parametrize("text", ["4111,1111", "4111/1111/", "536_22_", "GB82,WEST,1234,"])
def test_stream_holdback_covers_exotic_separators(text):
    # a stream must keep back the groups that a later chunk could complete
    assert DS.holdback("text " + text) >= len(text) - 1

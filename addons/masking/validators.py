"""Checksums and plausibility checks used by the detectors (pure functions, no I/O)."""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache


def luhn_ok(digits: str) -> bool:
    """ISO/IEC 7812 check digit over an ASCII digit string."""
    total = 0
    parity = len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# digit byte -> the digit doubled, digits summed (Luhn's doubled positions)
_LUHN_DOUBLE = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))


def luhn_ok_b(digits: bytes) -> bool:
    """luhn_ok of ASCII digits as bytes, in C: the undoubled digits (from the right: 1st,
    3rd, …) summed as bytes minus 48 each, plus the doubled ones through a table."""
    return (sum(digits[-1::-2]) - 48 * ((len(digits) + 1) // 2)
            + sum(digits[-2::-2].translate(_LUHN_DOUBLE))) % 10 == 0


def mod97_ok(value: str) -> bool:
    """ISO 7064 MOD 97-10 as used by IBAN: move the first 4 chars to the end, letters->10..35."""
    s = value[4:] + value[:4]
    rem = 0
    for ch in s:
        if "0" <= ch <= "9":
            rem = (rem * 10 + ord(ch) - 48) % 97
        elif "A" <= ch <= "Z":
            rem = (rem * 100 + ord(ch) - 55) % 97
        else:
            return False
    return rem == 1


# (lowest prefix, highest prefix, allowed lengths). Prefixes compare on the same number of
# leading digits. Sources: issuers' published IIN ranges (Visa, Mastercard incl. the 2-series
# 2221-2720, Amex, Discover incl. the China UnionPay co-brand 622126-622925, JCB, Diners,
# UnionPay, Maestro, Mir, RuPay, Verve, Troy, UATP).
_R = range
CARD_RANGES: tuple[tuple[int, int, frozenset[int]], ...] = (
    (4, 4, frozenset((13, 16, 19))),                     # Visa
    (51, 55, frozenset((16,))),                          # Mastercard
    (2221, 2720, frozenset((16,))),                      # Mastercard 2-series
    (34, 34, frozenset((15,))), (37, 37, frozenset((15,))),  # Amex
    (6011, 6011, frozenset(_R(16, 20))),                 # Discover
    (644, 649, frozenset(_R(16, 20))), (65, 65, frozenset(_R(16, 20))),
    (622126, 622925, frozenset(_R(16, 20))),
    (3528, 3589, frozenset(_R(16, 20))),                 # JCB
    (300, 305, frozenset(_R(14, 20))), (3095, 3095, frozenset(_R(14, 20))),  # Diners
    (36, 36, frozenset(_R(14, 20))), (38, 39, frozenset(_R(16, 20))),
    (62, 62, frozenset(_R(16, 20))), (81, 81, frozenset(_R(16, 20))),  # UnionPay
    (50, 50, frozenset(_R(13, 20))), (56, 69, frozenset(_R(13, 20))),  # Maestro & co
    (2200, 2204, frozenset(_R(16, 20))),                 # Mir
    (60, 60, frozenset(_R(16, 20))), (82, 82, frozenset((16,))), (508, 508, frozenset((16,))),
    (9792, 9792, frozenset((16,))),                      # Troy
    (1, 1, frozenset((15,))),                            # UATP
)


@lru_cache(maxsize=4096)
def card_lengths(prefix6: str) -> frozenset[int]:
    """Card lengths the issuer ranges allow for numbers starting with these 6 digits."""
    out: set[int] = set()
    for lo, hi, lengths in CARD_RANGES:
        k = len(str(lo))
        if lo <= int(prefix6[:k]) <= hi:
            out |= lengths
    return frozenset(out)


def card_issuer_ok(digits: str) -> bool:
    return len(digits) in card_lengths(digits[:6])


def card_ok(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and card_issuer_ok(digits) and luhn_ok(digits)


def card_ok_b(digits: bytes) -> bool:
    """card_ok of ASCII digits as bytes."""
    return 13 <= len(digits) <= 19 and len(digits) in card_lengths(digits[:6].decode("ascii")) \
        and luhn_ok_b(digits)


# Published advertising / sample numbers the SSA voided; not anyone's number.
SSN_SAMPLES = frozenset(("078051120", "219099999", "457555462"))


def ssn_ok(digits: str) -> bool:
    """SSA rules: no area 000, 666 or 9xx, no group 00, no serial 0000, not a voided sample,
    not one digit repeated (111-11-1111 is a placeholder, never issued)."""
    if len(digits) != 9:
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area == "000" or area == "666" or area[0] == "9":
        return False
    if group == "00" or serial == "0000":
        return False
    if digits in SSN_SAMPLES or digits == digits[0] * 9:
        return False
    return True


def shannon_entropy(s: str) -> float:
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def looks_placeholder(s: str, min_entropy: float = 2.5) -> bool:
    """True for strings no real secret looks like: 'xxxxxxxx', 'ZZZZ…', 'abcdefgh…1234567'.

    Real tokens are random: their character entropy is high and they do not run through the
    alphabet. This only decides between a secret and an obvious stand-in; the shape was
    already matched by the caller.
    """
    if shannon_entropy(s) < min_entropy:
        return True
    if len(s) >= 8:
        steps = sum(1 for a, b in zip(s, s[1:], strict=False) if ord(b) - ord(a) == 1)
        if steps * 4 > (len(s) - 1) * 3:
            return True
    return False


# IBAN length by country (ISO 13616 registry)
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}

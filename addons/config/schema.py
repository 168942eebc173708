"""Rules schema helpers: errors that name file, key and reason, typed `expect_*` readers and
the merged mapping section every concern's parser receives.

A leaf: imports nothing of ours, so every concern's `config.py` can use it without cycles.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A rules problem: which file, which key, and why."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        super().__init__(f"{file}: {key}: {reason}")


@dataclass(frozen=True)
class Where:
    """Position of a value inside the rules, for error messages."""

    file: str
    key: str

    def child(self, key: str | int) -> Where:
        if isinstance(key, int):
            return Where(self.file, f"{self.key}[{key}]")
        return Where(self.file, f"{self.key}.{key}" if self.key else key)

    def error(self, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key, reason)


def expect_map(value: Any, where: Where, allowed: set[str] | None = None,
               required: tuple[str, ...] = ()) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise where.error(f"keys must be strings, got {k!r}")
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise where.child(unknown[0]).error(
                f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for r in required:
        if r not in value:
            raise where.child(r).error("required key is missing")
    return value


def expect_str(value: Any, where: Where, *, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise where.error("must not be empty")
    return value


def expect_bool(value: Any, where: Where) -> bool:
    if not isinstance(value, bool):
        raise where.error(f"expected true or false, got {value!r}")
    return value


def expect_number(value: Any, where: Where, *, minimum: float | None = None,
                  maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(f"expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise where.error(f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise where.error(f"must be <= {maximum}, got {value}")
    return value


def expect_int(value: Any, where: Where, *, minimum: int | None = None,
               maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"expected a whole number, got {value!r}")
    expect_number(value, where, minimum=minimum, maximum=maximum)
    return value


def expect_str_list(value: Any, where: Where, *, allow_single: bool = True) -> tuple[str, ...]:
    """A list of strings; a single string is accepted as a one-element list."""
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise where.error(f"expected a list of strings, got {type(value).__name__}")
    return tuple(expect_str(v, where.child(i)) for i, v in enumerate(value))


def expect_regex(value: Any, where: Where, flags: int = 0) -> re.Pattern[str]:
    text = expect_str(value, where)
    try:
        return re.compile(text, flags)
    except re.error as e:
        raise where.error(f"invalid regular expression: {e}") from None



def read_secret(env: str | None, file: str | None) -> str | None:
    """A secret from an environment variable or a file (re-read each call, so a rotated
    Kubernetes secret needs no restart); None when unset, empty or unreadable."""
    if env:
        return os.environ.get(env) or None
    if file:
        try:
            return Path(file).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class MapSection:
    """A mapping section merged across files, remembering where each key came from."""

    name: str
    data: dict[str, Any]
    origins: dict[str, str]

    def where(self, key: str | None = None) -> Where:
        file = self.origins.get(key, "") if key else next(iter(self.origins.values()), "")
        return Where(file or "<defaults>", f"{self.name}.{key}" if key else self.name)



Parser = Callable[[MapSection], Any]

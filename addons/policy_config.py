"""Parse the `policies` list of the rules."""

from __future__ import annotations

from typing import Any

from addons.config import Upstream, Where, expect_map


def parse_policies(items: list[tuple[Any, Where]], upstreams: tuple[Upstream, ...]) -> tuple:
    for raw, where in items:
        expect_map(raw, where, set())
    return ()

"""Parse the `policies` list and the `approvals` section of the rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from addons.config import MapSection, Upstream, Where, expect_map


@dataclass(frozen=True)
class ApprovalsConfig:
    pass


def parse_policies(items: list[tuple[Any, Where]], upstreams: tuple[Upstream, ...]) -> tuple:
    for raw, where in items:
        expect_map(raw, where, set())
    return ()


def parse_approvals(section: MapSection) -> ApprovalsConfig:
    expect_map(section.data, section.where(), set())
    return ApprovalsConfig()

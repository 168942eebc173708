"""Parse the `approvals` section of the rules (reviewer API, notifications)."""

from __future__ import annotations

from dataclasses import dataclass

from addons.config import MapSection, expect_map


@dataclass(frozen=True)
class ApprovalsConfig:
    pass


def parse_approvals(section: MapSection) -> ApprovalsConfig:
    expect_map(section.data, section.where(), set())
    return ApprovalsConfig()

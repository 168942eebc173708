"""Parse the `recorder` section of the rules (retention, session headers)."""

from __future__ import annotations

from dataclasses import dataclass

from addons.config import MapSection, expect_map


@dataclass(frozen=True)
class RecorderConfig:
    pass


def parse_recorder(section: MapSection) -> RecorderConfig:
    expect_map(section.data, section.where(), set())
    return RecorderConfig()

"""Parse the `masking` section of the rules (detectors, strategies, custom patterns)."""

from __future__ import annotations

from dataclasses import dataclass

from addons.config import MapSection, expect_bool, expect_map


@dataclass(frozen=True)
class MaskingConfig:
    enabled: bool = True


def parse_masking(section: MapSection) -> MaskingConfig:
    d = expect_map(section.data, section.where(), {"enabled"})
    return MaskingConfig(enabled=expect_bool(d.get("enabled", True), section.where("enabled")))

"""Parse the `identity` section of the rules (issuers, token sources, caching)."""

from __future__ import annotations

from dataclasses import dataclass

from addons.config import MapSection, expect_bool, expect_map


@dataclass(frozen=True)
class IdentityConfig:
    required: bool = True


def parse_identity(section: MapSection) -> IdentityConfig:
    d = expect_map(section.data, section.where(), {"required"})
    required = expect_bool(d.get("required", True), section.where("required"))
    return IdentityConfig(required=required)

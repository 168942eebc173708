"""The masking addon. Not built yet: flows pass through unchanged (see its issue)."""

from __future__ import annotations

from addons.rules_loader import RulesHolder


class Masking:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder

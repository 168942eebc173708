"""The rules in force, shared by every addon of the gateway.

A leaf like `config/schema.py`: concerns import the holder, not the loader, so no concern
depends (even transitively) on the configuration of a concern after it in the data path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from addons.config.loader import Rules


class RulesHolder:
    """The rules in force. Addons read `holder.rules` on every flow (one attribute load)."""

    def __init__(self, rules: Rules | None = None) -> None:
        self.rules: Rules | None = rules
        self.version = 0 if rules is None else 1
        self.last_error: str | None = None
        self._listeners: list[Callable[[Rules], None]] = []
        self._lock = threading.Lock()

    def on_change(self, fn: Callable[[Rules], None]) -> None:
        """Call fn(rules) whenever new rules are installed (and now, if loaded)."""
        self._listeners.append(fn)
        if self.rules is not None:
            fn(self.rules)

    def install(self, rules: Rules) -> None:
        with self._lock:
            self.rules = rules
            self.version += 1
            self.last_error = None
        for fn in self._listeners:
            fn(rules)

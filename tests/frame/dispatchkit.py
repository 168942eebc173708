"""Switching mitmproxy's AddonManager between its own dispatch and frame/dispatch.py's,
for the dispatch tests (tests/frame/test_dispatch*.py)."""

from __future__ import annotations

import pytest
from mitmproxy import addonmanager

from addons.frame import dispatch


@pytest.fixture(autouse=True)
def restore(monkeypatch):
    """Every test leaves AddonManager as it found it (autouse where imported)."""
    cls = addonmanager.AddonManager
    for name in dispatch.ORIGINAL:
        monkeypatch.setattr(cls, name, getattr(cls, name))


def use(which: str) -> None:
    """Install mitmproxy's own dispatch ("mitmproxy") or the replacement (anything else)."""
    cls = addonmanager.AddonManager
    src = dispatch.ORIGINAL if which == "mitmproxy" else dispatch.REPLACEMENTS
    for name, fn in src.items():
        setattr(cls, name, fn)

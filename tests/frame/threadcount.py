"""Counting the worker-thread hand-overs of an addon module (tests of which bodies an
addon handles on the event loop and which in a thread)."""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import pytest


def count_to_thread(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[int]:
    """A list that grows by one per `asyncio.to_thread` call the module makes; each call
    still runs its function in the thread."""
    calls: list[int] = []
    real = asyncio.to_thread

    async def counting(fn: Any, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        return await real(fn, *a, **kw)

    # asyncio.to_thread itself (the module's hand-overs may go through frame/offload.py,
    # which calls it): every hand-over in this process is counted, as before
    del module
    monkeypatch.setattr(asyncio, "to_thread", counting)
    return calls

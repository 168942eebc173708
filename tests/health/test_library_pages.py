"""The gateway process gives back the shared libraries' pages that starting up faulted in
(addons/health/memory.py at `running`: frame/pages.drop_library_pages), and keeps serving
with them gone: the pages masking, TLS and the recorder read come back on first use.

Before: hyperscan's library (its pattern compiler, run once at start-up) stayed ~5 MiB
resident, and the process's file-backed RSS ~36 MiB (bare mitmdump: ~28), counted in its
peak for good."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from addons.frame.pages import smaps_blocks

pytestmark = pytest.mark.integration

EMAIL = "ann.lee@example.com"


def library_kib(pid: int, fragment: str) -> tuple[int, int]:
    """(KiB resident of the read-only, unmodified mappings whose path holds `fragment`,
    KiB of the writable or privately copied ones)."""
    clean = copies = 0
    for head, fields in smaps_blocks(Path(f"/proc/{pid}/smaps").read_text()):
        parts = head.split()
        if len(parts) >= 6 and fragment in parts[5]:
            if "w" in parts[1] or fields.get("Anonymous"):
                copies += fields.get("Rss", 0)
            else:
                clean += fields.get("Rss", 0)
    return clean, copies


def status_kib(pid: int, key: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith(key + ":"))
    return int(line.split()[1])


def test_gateway_drops_start_up_library_pages_and_keeps_masking(
        gateway_factory, no_identity, standin) -> None:
    gw = gateway_factory("{standin_upstreams}" + no_identity)
    pid = gw.proc.pid
    assert "mitmdump" in Path(f"/proc/{pid}/cmdline").read_text()
    standin.clear()
    body = {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": f"mail {EMAIL} about the invoice " + "lorem " * 500}]}
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for i in range(5):
            r = c.post("https://api.openai.com/v1/chat/completions", json=body,
                       headers={"x-agent-session": f"pages-{i % 2}"})
            assert r.status_code == 200, r.text[:300]
            sent = standin.requests[-1]["body"]
            # masking's scanner (hyperscan) still runs: its pages came back as needed
            assert EMAIL not in sent and "[EMAIL_" in sent
    hs, _ = library_kib(pid, "hyperscan")
    # before: ~5,300 KiB (the compiler's code, run once); the scanner's own code comes back
    # as masking runs (1.1 MiB alone, 2.8 MiB seen in the full suite)
    assert hs < 4608, hs
    files = status_kib(pid, "RssFile")
    assert files < 31 * 1024, files  # before: ~36,000 KiB

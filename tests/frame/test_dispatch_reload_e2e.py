"""The hook table through a real mitmdump: a script reload is never answered by a stale
table. Each reload of the gateway script brings new addon objects; the next flows must
reach the new ones (a marker addon added, changed, then taken away again), and every
concern must still run on them (masking: the e-mail never reaches the upstream;
credentials: the agent's key is replaced by the real one)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REAL_OPENAI_KEY, ROOT, Gateway

pytestmark = pytest.mark.integration

AGENT_KEY = "sk-agent-side-key-that-must-never-reach-upstream-0000"
EMAIL = "jane.reload@example.com"
MARK = '''

class _ReloadMark:
    """test addon: says which version of the script answered"""
    def response(self, flow):
        flow.response.headers["x-reload-mark"] = "{mark}"


addons.append(_ReloadMark())
'''


def post(gw: Gateway) -> httpx.Response:
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        return c.post("https://api.openai.com/v1/chat/completions",
                      headers={"authorization": f"Bearer {AGENT_KEY}"},
                      json={"model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": f"mail {EMAIL} now"}]})


def until_mark(gw: Gateway, want: str | None, standin, timeout: float = 30) -> httpx.Response:
    """Requests until the answer carries mark `want` (None: no mark); every one of them
    must have gone through masking and the credential swap."""
    deadline = time.monotonic() + timeout
    while True:
        standin.clear()
        r = post(gw)
        assert r.status_code == 200, r.text
        (up,) = standin.requests
        assert EMAIL not in json.dumps(up)                                     # masking ran
        assert dict(up["headers"])["authorization"] == f"Bearer {REAL_OPENAI_KEY}"  # creds
        if r.headers.get("x-reload-mark") == want:
            return r
        assert time.monotonic() < deadline, (want, r.headers.get("x-reload-mark"), gw.logs())
        time.sleep(0.2)


def test_reloaded_script_is_what_answers_next(gateway_factory, no_identity, standin,
                                              tmp_path: Path) -> None:
    script = tmp_path / "gateway.py"
    shutil.copy(ROOT / "addons" / "gateway.py", script)
    base = script.read_text()
    gw = gateway_factory("{standin_upstreams}" + no_identity
                         + "masking:\n  enabled: true\n", script=script)
    until_mark(gw, None, standin)
    for mark in ("one", "two"):
        time.sleep(1.1)  # mitmproxy's watcher compares modification times (1 s polls)
        script.write_text(base + MARK.replace("{mark}", mark))
        until_mark(gw, mark, standin)
        for _ in range(5):  # and it stays: no flow answered by the script before
            assert until_mark(gw, mark, standin, timeout=0).headers["x-reload-mark"] == mark
    time.sleep(1.1)
    script.write_text(base)
    until_mark(gw, None, standin)
    for _ in range(5):
        assert "x-reload-mark" not in until_mark(gw, None, standin, timeout=0).headers

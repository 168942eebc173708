"""Through a real mitmdump: a flow's decoded request is gone before the upstream round
trip and every decoded body when the flow ends, after masking, policy and the recorder
had what they need (the upstream still gets the masked body).

A probe script loaded after the gateway's sees each flow right after the gateway's last
request hook and last response hook and writes what the shared decode cache
(addons/frame/decode.py) still holds for it. Before the release (addons/health/memory.py)
the cache kept the decoded text, the parsed JSON and the original (unmasked) bytes until
the cyclic GC freed the flow.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.integration

EMAIL = "ann.lee@example.com"

PROBE = '''\
import json, os
from mitmproxy import ctx
from addons.frame import decode

OUT = os.environ["AGENTGATE_TEST_PROBE"]

def _slot(flow):
    with decode._lock:
        return sorted(decode._cache.get(flow, {}))

class Probe:
    def request(self, flow):
        self.at_request = {"cached": _slot(flow),
                           "raw_has_email": b"ann.lee@" in (flow.request.raw_content or b"")}

    def response(self, flow):
        with open(OUT, "a") as f:
            f.write(json.dumps({"request": self.at_request, "response": _slot(flow),
                                "collections": ctx.master.addons.get("memory").collections})
                    + "\\n")

addons = [Probe()]
'''


def _probed(gateway_factory, no_identity: str, tmp_path: Path) -> tuple[Gateway, Path]:
    """The gateway with the probe script after it; the probe's output file."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "probe.jsonl"
    gw: Gateway = gateway_factory(
        "{standin_upstreams}" + no_identity + "masking:\n  max_body_bytes: 4194304\n",
        env={"AGENTGATE_TEST_PROBE": str(out)}, extra_args=("-s", str(probe)))
    return gw, out


def test_decoded_bodies_released_after_every_step(gateway_factory, no_identity, standin,
                                                   tmp_path: Path) -> None:
    gw, out = _probed(gateway_factory, no_identity, tmp_path)
    standin.clear()
    body = {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": f"write to {EMAIL} " + "lorem ipsum " * 2000}]}
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        r = c.post("https://api.openai.com/v1/chat/completions", json=body,
                   headers={"x-agent-session": "release-1"})
    assert r.status_code == 200, r.text[:300]
    seen = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(seen) == 1, seen
    # masking ran (and read the decoded body) before the release
    assert seen[0]["request"]["raw_has_email"] is False
    sent = standin.requests[-1]["body"]
    assert EMAIL not in sent and "[EMAIL_" in sent
    # nothing of the request's decode outlives the request hooks, nothing at the end
    assert "request" not in seen[0]["request"]["cached"], seen
    assert seen[0]["response"] == [], seen


def test_finished_flows_collected_by_body_bytes(gateway_factory, no_identity,
                                                tmp_path: Path) -> None:
    # 10 finished flows of 1 MiB bodies are over the 8 MiB between two full collections
    # (addons/health/memory.py): one ran by the time the next flow ends
    gw, out = _probed(gateway_factory, no_identity, tmp_path)
    big = {"model": "gpt-4o-mini",
           "messages": [{"role": "user", "content": "lorem ipsum dolor " * 58000}]}
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60) as c:
        for i in range(11):
            r = c.post("https://api.openai.com/v1/chat/completions",
                       json=big if i < 10 else {"model": "gpt-4o-mini", "messages": []})
            assert r.status_code in (200, 400), r.text[:300]
    seen = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(seen) == 11
    assert seen[0]["collections"] == 0, seen[0]
    assert seen[-1]["collections"] >= 1, seen[-1]

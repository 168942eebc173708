"""`./run_proxy.sh replicas 2`: the one command, as a user runs it — a throwaway postgres,
two gateways, HAProxy on AGENTGATE_LISTEN; a request through it is answered; Ctrl-C / SIGTERM
stops everything (no process, no temp database left behind)."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from addons.devkit.launch import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_run_proxy_replicas(tmp_path: Path, standin) -> None:
    from addons.devkit.launch import standin_upstreams_yaml
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(standin_upstreams_yaml(standin)
                                  + "identity:\n  required: false\n")
    port = free_port()
    before = set(glob.glob("/tmp/agentgate-state-*"))
    env = {**os.environ, "AGENTGATE_LISTEN": f"127.0.0.1:{port}",
           "AGENTGATE_RULES": str(rules), "AGENTGATE_DATA": str(tmp_path / "data"),
           "OPENAI_API_KEY": "sk-test-not-real-0000000000000000000000"}
    env.pop("AGENTGATE_STATE", None)
    log = open(tmp_path / "out.log", "wb")  # noqa: SIM115 - closed below
    p = subprocess.Popen([str(ROOT / "run_proxy.sh"), "replicas", "2", "--", "--set",
                          f"ssl_verify_upstream_trusted_ca={standin.ca_path}"], env=env,
                         stdout=log,
                         stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in (tmp_path / "out.log").read_text():
            assert p.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "out.log").read_text()
            time.sleep(0.2)
        out = (tmp_path / "out.log").read_text()
        assert "2 replicas behind HAProxy" in out and "throwaway postgres" in out
        probes = re.findall(r"probes (http://\S+/readyz)", out)
        assert len(probes) == 2
        deadline = time.monotonic() + 30
        while not all(httpx.get(u, timeout=2).status_code == 200 for u in probes):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.2)  # HAProxy's health checks see both
        ca = ROOT / "certs" / "mitmproxy-ca-cert.pem"
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=str(ca)) as c:
            r = c.post("https://api.openai.com/v1/chat/completions",
                       json={"model": "gpt-4o-mini",
                             "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: hi"
        p.send_signal(signal.SIGTERM)
        assert p.wait(90) == 0
        assert "stopping (replicas drain)" in (tmp_path / "out.log").read_text()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        log.close()
    assert set(glob.glob("/tmp/agentgate-state-*")) <= before  # the temp database is gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(port) not in ps  # HAProxy (bound to the port) is gone

"""The approvals listener: AGENTGATE_APPROVALS_LISTEN, and a taken port's error (issue 12 item 5).

Precedence: `--set agentgate_approvals_listen` > `$AGENTGATE_APPROVALS_LISTEN` > the rules'
`approvals.listen`.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addons.approval.config import ApprovalsConfig, bind_reason, listen_text
from addons.devkit.launch import BIN, ROOT, free_port
from tests.approval.test_addon import make_addon

RULES_LISTEN = ("127.0.0.1", 18081)


def addon_with_env(monkeypatch, value: str | None):
    if value is None:
        monkeypatch.delenv("AGENTGATE_APPROVALS_LISTEN", raising=False)
    else:
        monkeypatch.setenv("AGENTGATE_APPROVALS_LISTEN", value)
    return make_addon(ApprovalsConfig(listen=RULES_LISTEN))


def test_rules_listen_without_env(monkeypatch) -> None:
    a = addon_with_env(monkeypatch, None)
    with taddons.context(a):
        assert a._listen() == RULES_LISTEN


def test_env_overrides_rules_and_set_overrides_env(monkeypatch) -> None:
    a = addon_with_env(monkeypatch, "127.0.0.1:19999")
    with taddons.context(a) as tctx:
        assert a._listen() == ("127.0.0.1", 19999)
        tctx.configure(a, agentgate_approvals_listen="[::1]:20000")
        assert a._listen() == ("::1", 20000)


def test_env_off_turns_the_api_off(monkeypatch) -> None:
    a = addon_with_env(monkeypatch, "off")
    with taddons.context(a):
        assert a._listen() is None


def test_bad_env_value_names_the_variable(monkeypatch) -> None:
    a = addon_with_env(monkeypatch, "localhost")
    with pytest.raises(exceptions.OptionsError, match=r"AGENTGATE_APPROVALS_LISTEN.*host:port"):
        with taddons.context(a) as tctx:
            tctx.configure(a, agentgate_approvals_listen=os.environ["AGENTGATE_APPROVALS_LISTEN"])


def test_bind_reason_and_address_text() -> None:
    assert "already in use" in bind_reason(OSError(errno.EADDRINUSE, "bind failed"))
    assert "permission" in bind_reason(OSError(errno.EACCES, "bind failed"))
    assert listen_text(("::1", 8081)) == "[::1]:8081"
    assert listen_text(("127.0.0.1", 8081)) == "127.0.0.1:8081"


# ---------------------------------------------------------------- through a real mitmdump
def run_gateway(tmp_path: Path, gateway_confdir: Path, env: dict[str, str],
                until: str, timeout: float = 60, tool: str = "mitmdump",
                extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """mitmdump with our addons and *no* --set agentgate_approvals_listen (unlike the
    launcher), until `until` appears in its output or it exits."""
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "rules.yaml").write_text("identity:\n  required: false\n"
                                      "approvals:\n  listen: 127.0.0.1:1\n")
    log = tmp_path / "gw.log"
    penv = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    penv.pop("AGENTGATE_APPROVALS_LISTEN", None)
    penv.update(env)
    proc = subprocess.Popen(
        [str(BIN / tool), "-s", str(ROOT / "addons" / "gateway.py"), *extra,
         "--listen-host", "127.0.0.1", "--listen-port", str(free_port()),
         "--set", f"confdir={gateway_confdir}", "--set", f"agentgate_rules={rules}",
         "--set", f"agentgate_data={tmp_path / 'data'}"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=penv, cwd=str(ROOT))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if until in text or proc.poll() is not None:
            break
        time.sleep(0.1)
    return proc, log.read_text(errors="replace")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.integration
def test_env_moves_the_listener(tmp_path, gateway_confdir) -> None:
    port = free_port()
    proc, text = run_gateway(tmp_path, gateway_confdir,
                             {"AGENTGATE_APPROVALS_LISTEN": f"127.0.0.1:{port}"},
                             "approvals API listening")
    try:
        assert f"approvals API listening at http://127.0.0.1:{port}" in text
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        stop(proc)


@pytest.mark.integration
def test_taken_port_names_the_address_and_the_way_out(tmp_path, gateway_confdir) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc, text = run_gateway(tmp_path, gateway_confdir,
                                 {"AGENTGATE_APPROVALS_LISTEN": f"127.0.0.1:{port}"},
                                 "Error logged during startup")
        try:
            proc.wait(30)  # mitmproxy stops on an error logged during startup
        finally:
            stop(proc)
        text = (tmp_path / "gw.log").read_text(errors="replace")
    line = next(ln for ln in text.splitlines() if "approvals API cannot listen" in ln)
    assert f"127.0.0.1:{port}" in line
    assert "already in use" in line
    assert re.search(r"AGENTGATE_APPROVALS_LISTEN=HOST:PORT", line)
    assert "agentgate_approvals_listen" in line
    # not the misleading promise of a gateway that goes on running
    assert "held requests can only be decided in mitmweb" not in line


@pytest.mark.integration
def test_mitmweb_on_the_same_port_is_named(tmp_path, gateway_confdir) -> None:
    """mitmweb's web UI and the approvals API both default to 8081: under `./run_proxy.sh
    web` the error says it is mitmweb's own port and how to move it."""
    port = free_port()
    proc, _ = run_gateway(tmp_path, gateway_confdir,
                          {"AGENTGATE_APPROVALS_LISTEN": f"127.0.0.1:{port}"},
                          "Error logged during startup", tool="mitmweb",
                          extra=("--set", f"web_port={port}", "--set", "web_open_browser=false"))
    try:
        proc.wait(30)
    finally:
        stop(proc)
    text = (tmp_path / "gw.log").read_text(errors="replace")
    line = next(ln for ln in text.splitlines() if "approvals API cannot listen" in ln)
    assert f"mitmweb's own web UI listens there (web_port {port})" in line
    assert "--set web_port=8082" in line and "AGENTGATE_APPROVALS_LISTEN=HOST:PORT" in line

"""A new user starts `./run_proxy.sh` while something already listens on its address (a
gateway left running, another proxy on 8080). mitmproxy's own message ends with "Try
specifying a different port by using `--mode regular@8082`", which under run_proxy.sh
adds a second listener and leaves the printed env block pointing at the taken address.
The script now says which variable moves it (AGENTGATE_LISTEN) before printing anything
else. A port that is free, or was just used (TIME_WAIT), still starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from addons.devkit.launch import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def run_proxy(tmp_path: Path, listen: str, wait: float) -> tuple[int | None, str]:
    venv = ROOT / ".venv"
    if not (venv / ".agentgate-deps").exists():
        pytest.skip("needs the venv made by ./run_proxy.sh")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(AGENTGATE_VENV=str(venv), AGENTGATE_LISTEN=listen,
               AGENTGATE_DATA=str(tmp_path / "data"),
               AGENTGATE_APPROVALS_LISTEN=f"127.0.0.1:{free_port()}")
    p = subprocess.Popen(["/bin/bash", str(ROOT / "run_proxy.sh")], env=env, cwd=str(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        rc = p.wait(wait)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
    assert p.stdout is not None
    return rc, p.stdout.read()


def test_a_taken_listen_address_names_the_variable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        listen = f"127.0.0.1:{s.getsockname()[1]}"
        rc, out = run_proxy(tmp_path, listen, wait=60)
    assert rc == 1, out[-2000:]
    assert f"{listen} is already in use" in out and "AGENTGATE_LISTEN=HOST:PORT" in out, out
    assert "--mode regular" not in out and "HTTPS_PROXY" not in out, out


def test_a_free_or_just_released_address_starts(tmp_path: Path) -> None:
    port = free_port()
    # leave a connection in TIME_WAIT on it: no listener, so not "in use"
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen()
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = srv.accept()
        a.close()  # the server side closes first: its end waits in TIME_WAIT
        c.close()
    time.sleep(0.2)
    rc, out = run_proxy(tmp_path, f"127.0.0.1:{port}", wait=20)
    assert rc is None, out[-3000:]  # still running when stopped
    assert f"proxy listening at 127.0.0.1:{port}" in out, out[-3000:]

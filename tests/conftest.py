"""Shared fixtures: the stand-in upstream and real mitmdump gateways with the suite loaded.

Everything listens on 127.0.0.1 with ports picked by the OS; nothing needs the internet.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from addons.standin import StandIn

pytest_plugins = ["oidc_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Fake but realistic-looking upstream secrets: tests grep every artifact for them.
REAL_OPENAI_KEY = "sk-proj-GATEWAYREALKEY0000000000000000000000000000000000"
REAL_ANTHROPIC_KEY = "sk-ant-api03-GATEWAYREALKEY00000000000000000000000000000000000000"
REAL_WEBHOOK_TOKEN = "whk-GATEWAYREALTOKEN-0000000000000000"
GATEWAY_ENV = {
    "OPENAI_API_KEY": REAL_OPENAI_KEY,
    "ANTHROPIC_API_KEY": REAL_ANTHROPIC_KEY,
    "WEBHOOK_TOKEN": REAL_WEBHOOK_TOKEN,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standin_upstreams_yaml(standin: StandIn) -> str:
    """Upstreams with real public host names, routed to the stand-in by `forward_to`."""
    return textwrap.dedent(f"""\
        upstreams:
          - name: openai
            hosts: [api.openai.com]
            dialect: openai
            forward_to: {standin.url}
            credential: {{header: Authorization, prefix: "Bearer ", env: OPENAI_API_KEY}}
          - name: anthropic
            hosts: [api.anthropic.com]
            dialect: anthropic
            forward_to: {standin.url}
            credential: {{header: x-api-key, env: ANTHROPIC_API_KEY}}
          - name: webhook
            hosts: [hooks.example.com]
            dialect: webhook
            forward_to: {standin.url}
            credential: {{header: X-Webhook-Token, env: WEBHOOK_TOKEN}}
        """)


class Gateway:
    """A running `mitmdump -s addons/gateway.py` process."""

    def __init__(self, proc: subprocess.Popen, port: int, confdir: Path, rules_dir: Path,
                 data_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.confdir = confdir
        self.rules_dir = rules_dir
        self.data_dir = data_dir
        self.log_path = log_path

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def proxy_url(self, token: str | None = None) -> str:
        auth = f"agent:{token}@" if token else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """Environment for an agent process: nothing but proxy and CA."""
        env = {k: v for k, v in os.environ.items()
               if k not in GATEWAY_ENV and not k.endswith("_PROXY") and not k.endswith("_proxy")}
        env.update(HTTPS_PROXY=self.proxy_url(token), HTTP_PROXY=self.proxy_url(token),
                   SSL_CERT_FILE=str(self.ca_cert), REQUESTS_CA_BUNDLE=str(self.ca_cert),
                   NO_PROXY="", no_proxy="")
        return env

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_gateway(rules_dir: Path, confdir: Path, data_dir: Path, log_path: Path,
                  standin_ca: Path | None = None, env: dict[str, str] | None = None,
                  extra_args: tuple[str, ...] = (), web: bool = False,
                  wait: bool = True) -> Gateway:
    port = free_port()
    args = [str(BIN / ("mitmweb" if web else "mitmdump")),
            "-s", str(ROOT / "addons" / "gateway.py"),
            "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={confdir}",
            "--set", f"agentgate_rules={rules_dir}",
            "--set", f"agentgate_data={data_dir}",
            "--set", "connection_strategy=lazy",
            "--set", "agentgate_rules_poll_ms=200"]
    if web:
        args += ["--set", f"web_port={free_port()}", "--set", "web_open_browser=false"]
    if standin_ca is not None:
        args += ["--set", f"ssl_verify_upstream_trusted_ca={standin_ca}"]
    args += list(extra_args)
    penv = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    penv.update(GATEWAY_ENV)
    penv.update(env or {})
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=penv,
                            cwd=str(ROOT))
    gw = Gateway(proc, port, confdir, rules_dir, data_dir, log_path)
    if wait:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited {proc.returncode}:\n{gw.logs()}")
            if "proxy listening" in gw.logs():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    return gw
                except OSError:
                    pass
            time.sleep(0.05)
        gw.stop()
        raise RuntimeError(f"mitmdump did not start:\n{gw.logs()}")
    return gw


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    s = StandIn(certdir=tmp_path_factory.mktemp("standin-certs")).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def gateway_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One interception CA for the whole session (generating RSA keys is slow)."""
    from mitmproxy.certs import CertStore
    d = tmp_path_factory.mktemp("gateway-confdir")
    CertStore.from_store(d, "mitmproxy", 2048)
    return d


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def gateway_factory(tmp_path: Path, gateway_confdir: Path,
                    standin: StandIn) -> Iterator[GatewayFactory]:
    """make(rules_yaml: str | dict[filename, yaml], env=…, extra_args=…) -> Gateway.

    `{standin_upstreams}` in a rules text is replaced by upstreams routed to the stand-in.
    """
    started: list[Gateway] = []

    def make(rules: str | dict[str, str] | Path | None = None, *,
             env: dict[str, str] | None = None, extra_args: tuple[str, ...] = (),
             web: bool = False, wait: bool = True) -> Gateway:
        n = len(started)
        if isinstance(rules, Path):
            rules_dir = rules
        else:
            rules_dir = tmp_path / f"rules{n}"
            rules_dir.mkdir()
            files = rules if isinstance(rules, dict) else {
                "rules.yaml": rules if rules is not None else "{standin_upstreams}"}
            for name, text in files.items():
                (rules_dir / name).write_text(
                    text.replace("{standin_upstreams}", standin_upstreams_yaml(standin)))
        data_dir = tmp_path / f"data{n}"
        data_dir.mkdir(exist_ok=True)
        gw = start_gateway(rules_dir, gateway_confdir, data_dir, tmp_path / f"gateway{n}.log",
                           standin_ca=standin.ca_path, env=env, extra_args=extra_args, web=web,
                           wait=wait)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def no_identity() -> str:
    """Rules fragment for tests of other concerns that run without OIDC tokens."""
    return "identity:\n  required: false\n"


def have(tool: str) -> bool:
    return shutil.which(tool) is not None

"""One real gateway (local OIDC issuer, stand-in upstream) with `agentgate connect` in front of
it, shared by the tests of one module (each defines a module-scoped `stack` fixture calling
`start_stack`): the per-client tests (test_clients.py, test_node.py) only
start client processes against it. Each client gets the environment docs/CONNECT.md gives it
and nothing else: every proxy, CA and API-key variable of the test runner is removed first."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from addons.devkit.launch import Gateway
from addons.devkit.standin import StandIn
from tests.conftest import standin_upstreams_yaml, start_gateway
from tests.connect.helpers import free_port
from tests.oidc_fixtures import LocalIssuer

ROOT = Path(__file__).resolve().parents[2]

# What docs/CONNECT.md writes for the connector and the CA; tests substitute the real ones.
DOC_CONNECTOR = "http://127.0.0.1:8888"
DOC_CA = "/gateway-ca/mitmproxy-ca-cert.pem"

# Variables a client could otherwise pick up from the runner's environment.
_STRIP = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
          "NODE_EXTRA_CA_CERTS", "NODE_OPTIONS", "NODE_USE_ENV_PROXY", "WEBHOOK_TOKEN")


@dataclass
class Stack:
    gateway: Gateway
    connector_url: str
    token: str

    def env(self, doc_lines: dict[str, str]) -> dict[str, str]:
        """The runner's environment minus everything proxy/CA/key related, plus `doc_lines`
        (written as in docs/CONNECT.md) with the real connector address and CA path."""
        env = {k: v for k, v in os.environ.items()
               if not k.lower().endswith("_proxy") and not k.endswith("_API_KEY")
               and k not in _STRIP}
        for k, v in doc_lines.items():
            env[k] = (v.replace(DOC_CONNECTOR, self.connector_url)
                      .replace(DOC_CA, str(self.gateway.ca_cert)))
        return env


def start_stack(tmp: Path, gateway_confdir: Path, standin: StandIn,
                issuer: LocalIssuer) -> Iterator[Stack]:
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "upstreams.yaml").write_text(standin_upstreams_yaml(standin))
    (rules / "identity.yaml").write_text(issuer.identity_yaml())
    (rules / "misc.yaml").write_text('approvals:\n  listen: "off"\n')
    data = tmp / "data"
    data.mkdir()
    gw = start_gateway(rules, gateway_confdir, data, tmp / "gateway.log",
                       standin_ca=standin.ca_path)
    token = issuer.token(sub="client-tests", expires_in=3600)
    token_file = tmp / "token"
    token_file.write_text(token)
    port = free_port()
    conn = subprocess.Popen(
        [sys.executable, "-m", "addons.cli", "connect", "--gateway",
         f"http://127.0.0.1:{gw.port}", "--listen", f"127.0.0.1:{port}",
         "--token-file", str(token_file)], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        assert conn.stderr is not None
        line = conn.stderr.readline()
        assert "listening on" in line, line
        yield Stack(gw, f"http://127.0.0.1:{port}", token)
    finally:
        conn.terminate()
        conn.communicate(timeout=20)
        gw.stop()


def saw(standin: StandIn, marker: str) -> list[dict]:
    """The stand-in's requests whose body carries `marker` (each test sends its own)."""
    return [r for r in standin.requests if marker in r["body"]]

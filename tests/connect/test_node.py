"""The Node preload (addons/connect/node/agentgate-proxy.mjs) through `agentgate connect` and a
real gateway: the official `openai` npm SDK, unchanged, configured by environment variables
and `NODE_OPTIONS=--import <preload>` only, reaches the stand-in with the gateway's key;
without the preload the same program goes around the gateway (Node 18-22's fetch ignores
HTTPS_PROXY). Needs `node` and `npm` (and the npm registry for the pinned packages)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from addons.devkit.standin import StandIn
from tests.conftest import REAL_OPENAI_KEY
from tests.connect.stack import DOC_CA, DOC_CONNECTOR, Stack, saw, start_stack
from tests.oidc_fixtures import LocalIssuer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, gateway_confdir: Path, standin: StandIn,
          local_issuer: LocalIssuer) -> Iterator[Stack]:
    """One gateway + connector for this module's client processes."""
    yield from start_stack(tmp_path_factory.mktemp("stack"), gateway_confdir, standin,
                           local_issuer)


ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "addons" / "connect" / "node"
PRELOAD = NODE_DIR / "agentgate-proxy.mjs"
OPENAI_NPM = "6.49.0"  # the last major that still runs on Node 20 (7.x needs Node >= 22)
DOC = ROOT / "docs" / "CONNECT.md"
DOC_PRELOAD = "/opt/agentgate/addons/connect/node/agentgate-proxy.mjs"

# The Node < 24 row of docs/CONNECT.md (as written there).
NODE_ROW = {"HTTPS_PROXY": DOC_CONNECTOR, "NODE_EXTRA_CA_CERTS": DOC_CA,
            "OPENAI_API_KEY": "sk-placeholder", "NODE_OPTIONS": f"--import {DOC_PRELOAD}"}

AGENT = """
import OpenAI from 'openai'
const client = new OpenAI({ maxRetries: 0, timeout: 30000 })
const r = await client.chat.completions.create({
  model: 'gpt-4o-mini', messages: [{ role: 'user', content: process.argv[2] }] })
console.log('200', r.choices[0].message.content)
"""

FETCH = """
const r = await fetch('https://api.openai.com/v1/chat/completions', { method: 'POST',
  headers: { 'content-type': 'application/json', authorization: 'Bearer sk-placeholder' },
  body: JSON.stringify({ model: 'gpt-4o-mini',
                         messages: [{ role: 'user', content: process.argv[2] }] }) })
console.log(r.status)
"""


def _npm(args: list[str], cwd: Path) -> None:
    p = subprocess.run(["npm", *args, "--no-audit", "--no-fund"], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        pytest.fail(f"npm {' '.join(args)} in {cwd} failed: {p.stderr[-2000:]}")


@pytest.fixture(scope="session")
def node_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The preload's pinned dependency installed (as the docs say: `npm ci --omit=dev`) and a
    throwaway agent project with the pinned `openai` package. Installed once per session."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node/npm not installed: the Node preload cannot be tested here")
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    want = lock["packages"]["node_modules/undici"]["version"]
    have = NODE_DIR / "node_modules" / "undici" / "package.json"
    # `npm ci` wipes node_modules first: skip it when the pinned version is already there, so
    # another process using the preload at this moment is not broken under its feet.
    if not have.exists() or json.loads(have.read_text())["version"] != want:
        _npm(["ci", "--omit=dev"], NODE_DIR)
    proj = tmp_path_factory.mktemp("node-agent")
    (proj / "package.json").write_text(json.dumps({"name": "agent", "private": True,
                                                   "type": "module"}))
    _npm(["install", "--save-exact", f"openai@{OPENAI_NPM}"], proj)
    (proj / "agent.mjs").write_text(AGENT)
    (proj / "fetch.mjs").write_text(FETCH)
    yield proj


def run_node(stack: Stack, proj: Path, script: str, marker: str,
             lines: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = stack.env({k: v.replace(DOC_PRELOAD, str(PRELOAD)) for k, v in lines.items()})
    return subprocess.run(["node", script, marker], cwd=proj, env=env, capture_output=True,
                          text=True, timeout=90)


def test_openai_npm_sdk_through_the_preload_and_the_connector(
        stack: Stack, standin, node_project: Path) -> None:
    marker = "node-openai-sdk-via-preload"
    p = run_node(stack, node_project, "agent.mjs", marker, NODE_ROW)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("200"), (p.stdout, p.stderr)
    assert "experimental" not in p.stderr  # the preload is quiet
    got = saw(standin, marker)
    assert len(got) == 1, got
    assert got[0]["path"] == "/v1/chat/completions"
    assert dict(got[0]["headers"])["authorization"] == f"Bearer {REAL_OPENAI_KEY}"
    assert stack.token not in json.dumps(got[0])


def test_without_the_preload_node_goes_around_the_gateway(
        stack: Stack, standin, node_project: Path) -> None:
    """Why the preload exists: the same program and env minus NODE_OPTIONS never reaches the
    gateway (it tries api.openai.com directly)."""
    marker = "node-openai-sdk-without-preload"
    row = {k: v for k, v in NODE_ROW.items() if k != "NODE_OPTIONS"}
    p = run_node(stack, node_project, "agent.mjs", marker, row)
    assert not p.stdout.startswith("200"), p.stdout
    assert saw(standin, marker) == []


def test_preload_trusts_ssl_cert_file(stack: Stack, standin,
                                      node_project: Path) -> None:
    """Node never reads SSL_CERT_FILE by itself; the preload adds it to the CA list."""
    marker = "node-fetch-ssl-cert-file"
    row = {k: v for k, v in NODE_ROW.items() if k != "NODE_EXTRA_CA_CERTS"}
    p = run_node(stack, node_project, "fetch.mjs", marker, {**row, "SSL_CERT_FILE": DOC_CA})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "200"
    assert len(saw(standin, marker)) == 1


def test_unreadable_ca_file_stops_node_with_a_clear_error(
        stack: Stack, standin, node_project: Path, tmp_path: Path) -> None:
    marker = "node-fetch-missing-ca"
    missing = tmp_path / "no-such-ca.pem"
    p = run_node(stack, node_project, "fetch.mjs", marker,
                 {**NODE_ROW, "NODE_EXTRA_CA_CERTS": str(missing)})
    assert p.returncode != 0
    assert f"agentgate-proxy: cannot read CA file {missing}" in p.stderr
    assert saw(standin, marker) == []


def test_no_proxy_is_honoured(stack: Stack, standin, node_project: Path) -> None:
    """EnvHttpProxyAgent reads NO_PROXY: a listed host is not sent to the connector (here it
    then fails to resolve or connect directly, and the stand-in sees nothing)."""
    marker = "node-fetch-no-proxy"
    p = run_node(stack, node_project, "fetch.mjs", marker,
                 {**NODE_ROW, "NO_PROXY": "api.openai.com"})
    assert p.stdout.strip() != "200"
    assert saw(standin, marker) == []


def test_the_node_row_is_in_the_doc() -> None:
    doc = DOC.read_text()
    for k, v in NODE_ROW.items():
        line = f'export {k}="{v}"' if " " in v else f"export {k}={v}"
        assert line in doc, line
    assert "export NODE_USE_ENV_PROXY=1" in doc
    assert "npm ci --omit=dev" in doc

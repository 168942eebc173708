"""docs/CONNECT.md's per-client table, proven: each Python client (and curl) runs as its own
process configured ONLY by the environment lines the table gives it (everything proxy, CA or
API-key related in the runner's environment is removed first), talks to api.openai.com /
api.anthropic.com through `agentgate connect` and a real gateway, and the stand-in upstream
receives the request with the gateway's key. A row whose variables are wrong (e.g. requests
with SSL_CERT_FILE only, aiohttp without trust_env) fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from addons.devkit.standin import StandIn
from tests.conftest import REAL_ANTHROPIC_KEY, REAL_OPENAI_KEY, have
from tests.connect.stack import DOC_CA, DOC_CONNECTOR, Stack, saw, start_stack
from tests.oidc_fixtures import LocalIssuer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, gateway_confdir: Path, standin: StandIn,
          local_issuer: LocalIssuer) -> Iterator[Stack]:
    """One gateway + connector for this module's client processes."""
    yield from start_stack(tmp_path_factory.mktemp("stack"), gateway_confdir, standin,
                           local_issuer)


DOC = Path(__file__).resolve().parents[2] / "docs" / "CONNECT.md"

PROXY = {"HTTPS_PROXY": DOC_CONNECTOR}
OPENAI_KEY = {"OPENAI_API_KEY": "sk-placeholder"}

# client -> the env lines of its row in docs/CONNECT.md (as written there)
ROWS: dict[str, dict[str, str]] = {
    "openai": {**PROXY, "SSL_CERT_FILE": DOC_CA, **OPENAI_KEY},
    "anthropic": {**PROXY, "SSL_CERT_FILE": DOC_CA, "ANTHROPIC_API_KEY": "sk-ant-placeholder"},
    "requests": {**PROXY, "REQUESTS_CA_BUNDLE": DOC_CA},
    "httpx": {**PROXY, "SSL_CERT_FILE": DOC_CA},
    "aiohttp": {**PROXY, "SSL_CERT_FILE": DOC_CA},
    "urllib": {**PROXY, "SSL_CERT_FILE": DOC_CA},
    "curl": {**PROXY, "CURL_CA_BUNDLE": DOC_CA},
}

URL = "https://api.openai.com/v1/chat/completions"


def chat_body(marker: str) -> str:
    return json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": marker}]})


# Each script prints the HTTP status (or the SDK's answer) and takes the marker as argv[1].
SCRIPTS: dict[str, str] = {
    "openai": """
        import sys, openai
        r = openai.OpenAI(max_retries=0, timeout=30).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": sys.argv[1]}])
        print("200", r.choices[0].message.content)
    """,
    "anthropic": """
        import sys, anthropic
        r = anthropic.Anthropic(max_retries=0, timeout=30).messages.create(
            model="claude-3-5-haiku-latest", max_tokens=32,
            messages=[{"role": "user", "content": sys.argv[1]}])
        print("200", r.content[0].text)
    """,
    "requests": """
        import sys, requests
        r = requests.post(URL, data=BODY, timeout=30, headers={
            "content-type": "application/json", "authorization": "Bearer sk-placeholder"})
        print(r.status_code)
    """,
    "httpx": """
        import sys, httpx
        r = httpx.post(URL, content=BODY, timeout=30, headers={
            "content-type": "application/json", "authorization": "Bearer sk-placeholder"})
        print(r.status_code)
    """,
    # aiohttp reads HTTPS_PROXY only with trust_env=True (that IS the documented line).
    "aiohttp": """
        import asyncio, sys, aiohttp
        async def main():
            async with aiohttp.ClientSession(trust_env=True) as s:
                async with s.post(URL, data=BODY, headers={
                        "content-type": "application/json",
                        "authorization": "Bearer sk-placeholder"}) as r:
                    print(r.status)
        asyncio.run(main())
    """,
    "urllib": """
        import sys, urllib.request
        req = urllib.request.Request(URL, data=BODY.encode(), headers={
            "content-type": "application/json", "authorization": "Bearer sk-placeholder"})
        print(urllib.request.urlopen(req, timeout=30).status)
    """,
}


def run_client(stack: Stack, client: str, marker: str) -> subprocess.CompletedProcess[str]:
    env = stack.env(ROWS[client])
    if client == "curl":
        cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30",
               "-H", "content-type: application/json",
               "-H", "authorization: Bearer sk-placeholder", "--data", chat_body(marker), URL]
    else:
        prelude = f"URL = {URL!r}\nBODY = {chat_body(marker)!r}\n"
        cmd = [sys.executable, "-c", prelude + textwrap.dedent(SCRIPTS[client]), marker]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("client", list(ROWS))
def test_client_through_the_connector_with_only_its_documented_env(
        stack: Stack, standin, client: str) -> None:
    if client == "curl" and not have("curl"):
        pytest.skip("curl is not installed")
    marker = f"row-{client}-through-the-connector"
    p = run_client(stack, client, marker)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("200"), (p.stdout, p.stderr)
    got = saw(standin, marker)
    assert len(got) == 1, got
    headers = dict(got[0]["headers"])
    if client == "anthropic":
        assert got[0]["path"] == "/v1/messages"
        assert headers["x-api-key"] == REAL_ANTHROPIC_KEY
    else:
        assert got[0]["path"] == "/v1/chat/completions"
        assert headers["authorization"] == f"Bearer {REAL_OPENAI_KEY}"
    assert stack.token not in json.dumps(got[0])
    assert "placeholder" not in json.dumps(got[0]["headers"])


def test_requests_ignores_ssl_cert_file(stack: Stack, standin) -> None:
    """Why the requests row names REQUESTS_CA_BUNDLE: with SSL_CERT_FILE alone it does not
    trust the gateway's CA, so the call fails and nothing reaches the upstream."""
    marker = "requests-with-ssl-cert-file-only"
    env = stack.env({**PROXY, "SSL_CERT_FILE": DOC_CA})
    prelude = f"URL = {URL!r}\nBODY = {chat_body(marker)!r}\n"
    p = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(SCRIPTS["requests"])],
                       env=env, capture_output=True, text=True, timeout=90)
    assert p.returncode != 0 and "SSL" in p.stderr, (p.stdout, p.stderr)
    assert saw(standin, marker) == []


def test_every_row_is_in_the_doc() -> None:
    """The table in docs/CONNECT.md carries exactly these lines (what the tests ran)."""
    doc = DOC.read_text()
    for client, lines in ROWS.items():
        for k, v in lines.items():
            assert f"export {k}={v}" in doc, (client, k, v)
    assert "trust_env=True" in doc


def test_run_proxy_prints_the_whole_block(tmp_path: Path) -> None:
    """The block ./run_proxy.sh prints before starting the gateway names the connector and
    every variable of every row (rendered by bash from the script's own text, so the gateway
    is not started and the shared venv and certs/ are not touched)."""
    script = (Path(__file__).resolve().parents[2] / "run_proxy.sh").read_text()
    start = script.index("  local ca=$CERTS/mitmproxy-ca-cert.pem")
    end = script.index("\nEOF\n", start) + len("\nEOF\n")
    block = script[start:end].replace("  local ", "  ", 1)
    env = {"PATH": "/usr/bin:/bin", "LISTEN": "127.0.0.1:8080", "RULES": "r", "DATA": "d",
           "CERTS": "/gateway-ca", "ROOT": "/opt/agentgate", "VENV": "/opt/agentgate/.venv",
           "tool": "mitmdump"}
    out = subprocess.run(["bash", "-c", block], env=env, capture_output=True, text=True,
                         check=True).stderr
    assert "/opt/agentgate/.venv/bin/agentgate connect --gateway http://127.0.0.1:8080" in out
    for client, lines in ROWS.items():
        for k, v in lines.items():
            assert f"export {k}={v}" in out, (client, k, v)
    assert 'export NODE_OPTIONS="--import /opt/agentgate/addons/connect/node/' \
           'agentgate-proxy.mjs"' in out
    assert "export NODE_USE_ENV_PROXY=1" in out and "trust_env=True" in out
    assert "docs/CONNECT.md" in out


def test_readme_links_connect_right_after_the_two_commands() -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    fence = text.index("```sh\n")
    block_end = text.index("```\n", fence + 6)
    block = text[fence + 6:block_end].splitlines()
    assert [ln.split("#")[0].strip() for ln in block] == ["./run_proxy.sh",
                                                          "./run_proxy.sh test"]
    after = text[block_end + 4:].lstrip("\n").splitlines()[0]
    assert "Connect your agent" in after and "(docs/CONNECT.md)" in after

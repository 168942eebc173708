"""Foundation through a real mitmdump: real SDK clients, default-deny, fail-closed, no leaks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.conftest import GATEWAY_ENV, REAL_OPENAI_KEY, ROOT, Gateway

pytestmark = pytest.mark.integration

AGENT_KEY = "sk-agent-side-key-that-must-never-reach-upstream-0000"


def sdk(gw: Gateway, key: str = AGENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, max_retries=0, timeout=30,
                         http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                               verify=str(gw.ca_cert)))


def proxied_urlopen(gw: Gateway, url: str, data: bytes | None = None):
    import ssl
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": gw.proxy_url(), "https": gw.proxy_url()}),
        urllib.request.HTTPSHandler(context=ctx))
    return opener.open(urllib.request.Request(url, data=data), timeout=30)


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity)


def test_openai_sdk_subprocess_via_env_only(gw: Gateway, standin) -> None:
    """A real `openai` client configured by HTTPS_PROXY + SSL_CERT_FILE alone."""
    standin.clear()
    code = (f"import openai; c = openai.OpenAI(api_key={AGENT_KEY!r}, max_retries=0);"
            "r = c.chat.completions.create(model='gpt-4o-mini', "
            "messages=[{'role': 'user', 'content': 'ping'}]);"
            "print(r.choices[0].message.content)")
    p = subprocess.run([sys.executable, "-c", code], env=gw.client_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "echo: ping"
    (req,) = standin.requests
    headers = dict(req["headers"])
    assert headers["authorization"] == f"Bearer {REAL_OPENAI_KEY}"
    assert AGENT_KEY not in json.dumps(req)


def test_streaming_and_anthropic_pass(gw: Gateway, standin) -> None:
    import anthropic
    standin.clear()
    chunks = sdk(gw).chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "stream me"}])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me"
    a = anthropic.Anthropic(api_key=AGENT_KEY, max_retries=0,
                            http_client=anthropic.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                                     verify=str(gw.ca_cert)))
    msg = a.messages.create(model="claude-sonnet-4-5", max_tokens=50,
                            messages=[{"role": "user", "content": "hi claude"}])
    assert msg.content[0].text == "echo: hi claude"
    anth = [r for r in standin.requests if r["path"].startswith("/v1/messages")]
    assert dict(anth[0]["headers"])["x-api-key"] == GATEWAY_ENV["ANTHROPIC_API_KEY"]
    assert "authorization" not in dict(anth[0]["headers"])


def test_undeclared_host_gets_403_json(gw: Gateway, standin) -> None:
    # HTTPS: refused at CONNECT, before any TLS or upstream connection
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(api_key=AGENT_KEY, base_url="https://evil.example.org/v1", max_retries=0,
                      http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                            verify=str(gw.ca_cert))
                      ).models.list()
    # plain HTTP through the proxy: the JSON error body is readable
    with pytest.raises(urllib.error.HTTPError) as ei:
        proxied_urlopen(gw, "http://evil.example.org/v1/chat/completions", b"{}")
    assert ei.value.code == 403
    body = json.loads(ei.value.read())
    assert body["error"]["code"] == "destination_not_allowed"
    assert "evil.example.org" in body["error"]["message"]
    assert "CONNECT evil.example.org:443" in gw.logs() and "403" in gw.logs()


FAULT_STEPS = ["rulesloader", "upstreams", "identity", "policy", "masking", "approval",
               "credentials", "recorder"]


@pytest.mark.parametrize("step", FAULT_STEPS)
def test_raising_addon_refuses_never_passes(gateway_factory, no_identity, standin,
                                            step: str) -> None:
    from addons import gateway
    from tests.frame.test_guard import hook_methods
    addon = next(a for a in gateway.build() if type(a).__name__.lower() == step)
    if not hook_methods(addon):
        pytest.skip(f"{step} has no hooks yet (its issue is open)")
    rules = "{standin_upstreams}" + no_identity
    if step == "approval":
        # the approval step only uses its state for a flow that must be held
        rules += ("policies:\n  - name: hold-everything\n    match: {upstream: [openai]}\n"
                  "    action: approve\n    approvers: [reviewers]\n")
    gw = gateway_factory(rules,
                         env={"AGENTGATE_TEST_FAULT": step},
                         extra_args=("-s", str(ROOT / "tests" / "fault_inject.py")))
    import time
    deadline = time.monotonic() + 15
    while f"poisoned {step}" not in gw.logs():  # logged from `running`, just after start
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.05)
    standin.clear()
    try:
        r = sdk(gw).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        status, text = r.http_response.status_code, r.http_response.text
    except openai.APIStatusError as e:
        status, text = e.status_code, e.response.text
    except openai.APIConnectionError as e:
        # refused at CONNECT: the proxy answered the tunnel request itself
        cause = repr(e.__cause__)
        assert "503" in cause or "502" in cause, cause
        assert f"{step}.http_connect failed" in gw.logs() or "failed" in gw.logs()
        assert standin.requests == []
        return
    assert status in (502, 503), text
    assert "internal error in" in text and "gateway_error" in text
    if status == 503:
        assert standin.requests == [], "a refused request reached the upstream"


def test_no_real_secret_in_logs_or_errors(gateway_factory, no_identity, standin,
                                          monkeypatch) -> None:
    gw = gateway_factory("{standin_upstreams}" + no_identity,
                         extra_args=("--set", "termlog_verbosity=debug",
                                     "--set", "flow_detail=4"))
    c = sdk(gw)
    c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}])
    errors = []
    for url in ("https://evil.example.org/x", "http://evil.example.org/x"):
        try:
            proxied_urlopen(gw, url, b"{}")
        except urllib.error.HTTPError as e:
            errors.append(e.read().decode())
        except urllib.error.URLError as e:
            errors.append(str(e))
    gw.stop()
    artifacts = gw.logs() + "\n".join(errors)
    assert "[injected by agentgate]" in artifacts  # the dump shows the header, redacted
    leaked = [k for k, v in GATEWAY_ENV.items() if v in artifacts]
    assert not leaked


def test_bad_rules_refuse_to_start(gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory({"bad.yaml": "upstreams:\n  - {name: a, hosts: [x.com], dialect: soap}\n"},
                         wait=False)
    rc = gw.proc.wait(60)
    assert rc != 0
    logs = gw.logs()
    assert "bad.yaml" in logs and "upstreams[0].dialect" in logs


def test_langgraph_agent_end_to_end(gw: Gateway, standin) -> None:
    """A real LangGraph agent (model node + webhook tool node), env-configured only."""
    standin.clear()
    p = subprocess.run([sys.executable, "-m", "addons.devkit.agent", "the nightly build is green"],
                       env=gw.client_env(), capture_output=True, text=True, timeout=120,
                       cwd=str(ROOT))
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["answer"] == "done: webhook answered 200"
    paths = [r["path"] for r in standin.requests]
    assert paths == ["/v1/chat/completions", "/agent-events", "/v1/chat/completions"]
    hook = standin.requests[1]
    assert dict(hook["headers"])["x-webhook-token"] == GATEWAY_ENV["WEBHOOK_TOKEN"]
    assert json.loads(hook["body"])["text"] == "the nightly build is green"
    for r in standin.requests:
        assert "managed-by-agentgate" not in json.dumps(r)


def test_mitmweb_runs_the_same_suite(gateway_factory, no_identity, standin) -> None:
    gw = gateway_factory("{standin_upstreams}" + no_identity, web=True)
    # the factory returns once the proxy accepts; mitmweb's UI server may log a moment later
    deadline = time.monotonic() + 30
    while "Web server listening" not in gw.logs():
        assert time.monotonic() < deadline, gw.logs()[-3000:]
        time.sleep(0.05)
    standin.clear()
    r = sdk(gw).chat.completions.create(model="gpt-4o-mini",
                                        messages=[{"role": "user", "content": "via web"}])
    assert r.choices[0].message.content == "echo: via web"
    assert dict(standin.requests[0]["headers"])["authorization"] == f"Bearer {REAL_OPENAI_KEY}"
    with pytest.raises(urllib.error.HTTPError) as ei:
        proxied_urlopen(gw, "http://evil.example.org/", b"{}")
    assert ei.value.code == 403


def test_broken_script_reload_closes_the_gateway(gateway_factory, no_identity, standin,
                                                 tmp_path: Path) -> None:
    """mitmproxy reloads a changed script and runs without it if it fails: refuse then."""
    import shutil
    import time
    script = tmp_path / "gateway.py"
    shutil.copy(ROOT / "addons" / "gateway.py", script)
    gw = gateway_factory("{standin_upstreams}" + no_identity, script=script)
    c = sdk(gw)
    assert c.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}]).choices
    script.write_text(script.read_text() + "\nthis is not python(\n")
    deadline = time.monotonic() + 20
    while "Loading script" not in gw.logs().split("proxy listening", 1)[1]:
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.2)
    time.sleep(0.5)
    standin.clear()
    # a new connection is refused at CONNECT (503), before any TLS
    with pytest.raises(openai.APIConnectionError) as ei:
        sdk(gw).chat.completions.create(model="gpt-4o-mini",
                                        messages=[{"role": "user", "content": "b"}])
    assert "503" in repr(ei.value.__cause__)
    # plain HTTP shows the JSON reason
    with pytest.raises(urllib.error.HTTPError) as he:
        proxied_urlopen(gw, "http://api.openai.com/v1/models")
    assert he.value.code == 503
    assert "pipeline_not_loaded" in he.value.read().decode()
    assert standin.requests == []
    # fixing the script brings the pipeline back
    shutil.copy(ROOT / "addons" / "gateway.py", script)
    deadline = time.monotonic() + 20
    while True:
        try:
            sdk(gw).chat.completions.create(model="gpt-4o-mini",
                                            messages=[{"role": "user", "content": "c"}])
            break
        except (openai.APIStatusError, openai.APIConnectionError):
            assert time.monotonic() < deadline, gw.logs()
            time.sleep(0.3)

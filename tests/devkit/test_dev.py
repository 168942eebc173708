"""`agentgate dev` and `agentgate token dev` (issue 12 item 5): a newcomer gets a local gateway,
a dev IdP and the stand-in on fixed loopback ports, a token command, and an env block that
works as printed; Ctrl-C stops all three and removes the work directory; non-loopback
addresses are refused; the default rules never trust the dev IdP."""

from __future__ import annotations

import base64
import json
import os
import queue
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from addons.config.loader import load_rules
from addons.devkit import dev
from addons.devkit.launch import BIN, free_port
from tests.conftest import ROOT

AGENTGATE = str(BIN / "agentgate")
REAL_USER_KEY = "sk-real-user-key-must-never-leave-" + "0123456789abcdef"

CLIENT = """
import sys, openai
r = openai.OpenAI().chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": sys.argv[1]}])
print(r.choices[0].message.content)
"""


def _ports() -> dict[str, int]:
    return {"gw": free_port(), "idp": free_port(), "up": free_port(), "page": free_port()}


def _base_env(tmp_path: Path, ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(AGENTGATE_LISTEN=f"127.0.0.1:{ports['gw']}",
               AGENTGATE_DEV_IDP=f"127.0.0.1:{ports['idp']}",
               AGENTGATE_DEV_UPSTREAM=f"127.0.0.1:{ports['up']}",
               AGENTGATE_APPROVALS_LISTEN=f"127.0.0.1:{ports['page']}",
               TMPDIR=str(tmp_path),  # the work directory lands where the test can see it
               OPENAI_API_KEY=REAL_USER_KEY)  # a user's real key: must not reach the stand-in
    return env


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


class Dev:
    def __init__(self, proc: subprocess.Popen, env: dict[str, str], ports: dict[str, int],
                 out: str) -> None:
        self.proc, self.env, self.ports, self.out = proc, env, ports, out

    def line(self, start: str) -> str:
        return next(ln.strip() for ln in self.out.splitlines() if ln.strip().startswith(start))

    @property
    def workdir(self) -> Path:
        return Path(self.line("work dir").split()[2])

    @property
    def ca(self) -> Path:
        return Path(self.line("export SSL_CERT_FILE=").split("=", 1)[1])

    def token(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([AGENTGATE, "token", "dev", *args], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def agent_env(self, token: str) -> dict[str, str]:
        """An agent's environment for the dev gateway: the token as proxy password, the
        CA, the placeholder key (no other key of the user's)."""
        env = {k: v for k, v in self.env.items() if not k.endswith("_API_KEY")}
        env.update(HTTPS_PROXY=f"http://agent:{token}@127.0.0.1:{self.ports['gw']}",
                   SSL_CERT_FILE=str(self.ca),
                   OPENAI_API_KEY=dev.PLACEHOLDER_KEYS["OPENAI_API_KEY"])
        return env

    def standin_received(self) -> list[dict]:
        ctx = ssl.create_default_context(cafile=str(self.workdir / "standin-certs" / "ca.pem"))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ctx))
        with opener.open(f"https://127.0.0.1:{self.ports['up']}/_standin/requests",
                         timeout=10) as r:
            return json.load(r)


@pytest.fixture
def dev_gateway(tmp_path: Path) -> Iterator[Dev]:
    ports = _ports()
    env = _base_env(tmp_path, ports)
    proc = subprocess.Popen([AGENTGATE, "dev"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for ln in proc.stdout:
            lines.put(ln)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    out: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            ln = lines.get(timeout=1)
        except queue.Empty:
            continue
        if ln is None:
            pytest.fail("agentgate dev exited:\n" + "".join(out))
        out.append(ln)
        if "approvals list --url" in ln:  # the last block: how to review held calls
            break
    else:
        proc.kill()
        pytest.fail("agentgate dev did not print its env block:\n" + "".join(out))
    d = Dev(proc, env, ports, "".join(out))
    d.lines = lines  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_token_then_a_real_openai_client_through_the_dev_gateway(dev_gateway: Dev) -> None:
    d = dev_gateway
    assert d.workdir.parent == Path(d.env["TMPDIR"]) and d.ca.is_file()
    t = d.token("--sub", "alice", "--groups", "a,b", "--ttl", "120")
    assert t.returncode == 0, t.stderr
    token = t.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    env = d.agent_env(token)
    r = subprocess.run([sys.executable, "-c", CLIENT, "hello from the dev mode"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "echo: hello from the dev mode"
    got = [q for q in d.standin_received() if q["path"].endswith("/chat/completions")]
    assert len(got) == 1
    auth = dict((k.lower(), v) for k, v in got[0]["headers"])["authorization"]
    # the gateway's throwaway key, neither the placeholder nor the user's real key
    assert auth.startswith("Bearer sk-dev-")
    assert REAL_USER_KEY not in json.dumps(got) and token not in json.dumps(got)

    # the token is the dev IdP's, as asked
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["sub"] == "alice" and claims["groups"] == ["a", "b"]
    assert claims["aud"] in ("agentgate", ["agentgate"]) and claims["exp"] - claims["iat"] == 120
    assert claims["iss"] == f"http://127.0.0.1:{d.ports['idp']}"

    # without a token the dev gateway refuses (identity stays required)
    env["HTTPS_PROXY"] = f"http://127.0.0.1:{d.ports['gw']}"
    r = subprocess.run([sys.executable, "-c", CLIENT, "no token"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert len([q for q in d.standin_received() if q["path"].endswith("/chat/completions")]) == 1


def test_printed_connector_command_works_as_printed(dev_gateway: Dev, tmp_path: Path) -> None:
    d = dev_gateway
    line = d.line(f"{AGENTGATE} connect ")
    argv = shlex.split(line.removesuffix("&").strip())
    assert argv[:4] == [AGENTGATE, "connect", "--gateway", f"http://127.0.0.1:{d.ports['gw']}"]
    token_cmd = shlex.split(argv[argv.index("--token-command") + 1])
    assert token_cmd[:3] == [AGENTGATE, "token", "dev"]
    listen = free_port()
    # the connector's environment without AGENTGATE_DEV_IDP: the printed command carries it
    cenv = {k: v for k, v in d.env.items() if k != "AGENTGATE_DEV_IDP"}
    conn = subprocess.Popen([*argv, "--listen", f"127.0.0.1:{listen}"], env=cenv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _accepts(listen):
            assert conn.poll() is None, conn.stderr.read() if conn.stderr else ""
            assert time.monotonic() < deadline, "connector did not listen"
            time.sleep(0.1)
        env = {k: v for k, v in d.env.items() if not k.endswith("_API_KEY")}
        env.update(HTTPS_PROXY=f"http://127.0.0.1:{listen}", SSL_CERT_FILE=str(d.ca),
                   OPENAI_API_KEY=dev.PLACEHOLDER_KEYS["OPENAI_API_KEY"])
        r = subprocess.run([sys.executable, "-c", CLIENT, "via the connector"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() == "echo: via the connector"
    finally:
        conn.send_signal(signal.SIGTERM)
        try:
            conn.wait(20)
        except subprocess.TimeoutExpired:
            conn.kill()


HELD_CLIENT = """
import sys, openai
r = openai.OpenAI(max_retries=0, timeout=120).chat.completions.create(
    model="review-me", messages=[{"role": "user", "content": sys.argv[1]}])
print(r.choices[0].message.content)
"""


def test_reviewers_page_works_out_of_the_box(dev_gateway: Dev) -> None:
    """The printed page URL and reviewer sign in (through the gateway's OIDC login at the
    dev IdP, as a browser would), see the held call, approve it with a reason, and the
    agent's call completes; the printed CLI command lists the hold; an outsider signed
    in sees nothing to decide; the page's client is registered at the IdP (only its own
    callback is accepted)."""
    from addons.devkit.reviewer import PageError, PageReviewer
    d = dev_gateway
    base = f"http://127.0.0.1:{d.ports['page']}"
    assert d.line("reviewers").split()[1] == base + "/ui/"
    assert d.line(f"open {base}/ui/").startswith(f"open {base}/ui/ in a browser")
    assert 'click "dev-reviewer"' in d.out and "group dev-reviewers" in d.out

    web = load_rules(d.workdir / "rules").approvals.web
    issuer = f"http://127.0.0.1:{d.ports['idp']}"
    assert web is not None and web.issuer == issuer
    assert web.redirect_url == base + "/ui/callback"
    query = urllib.parse.urlencode({"client_id": web.client_id, "response_type": "code",
                                    "scope": "openid", "redirect_uri": "http://evil.test/cb"})
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        direct.open(f"{issuer}/oauth2/authorize?{query}", timeout=10)
    assert refused.value.code == 400  # a registered client: another redirect is refused

    t = d.token("--sub", "dev-agent")
    assert t.returncode == 0, t.stderr
    env = {k: v for k, v in d.env.items() if not k.endswith("_API_KEY")}
    env.update(HTTPS_PROXY=f"http://agent:{t.stdout.strip()}@127.0.0.1:{d.ports['gw']}",
               SSL_CERT_FILE=str(d.ca), OPENAI_API_KEY=dev.PLACEHOLDER_KEYS["OPENAI_API_KEY"])
    agent = subprocess.Popen([sys.executable, "-c", HELD_CLIENT, "held for a reviewer"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reviewer = PageReviewer(base)
        reviewer.sign_in("dev-reviewer")
        deadline = time.monotonic() + 60
        while not (held := reviewer.pending()):
            assert agent.poll() is None, agent.communicate()
            assert time.monotonic() < deadline, "the call was not held"
            time.sleep(0.2)
        assert len(held) == 1 and agent.poll() is None  # the agent waits
        assert "held for a reviewer" in reviewer.detail(held[0])

        # the printed CLI line works as printed (in a shell: it has $(…))
        cmd = d.line("or from a shell:").removeprefix("or from a shell:").strip()
        r = subprocess.run(["bash", "-c", cmd], env=d.env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and held[0] in r.stdout, r.stderr

        outsider = PageReviewer(base)
        outsider.sign_in("someone-else")
        assert outsider.pending() == []
        with pytest.raises(PageError):
            outsider.vote(held[0], "approve", "let me")

        page = reviewer.vote(held[0], "approve", "fine for a dev try")
        assert "dev-reviewer approved via page" in page
        out, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err[-3000:]
        assert out.strip() == "echo: held for a reviewer"
        history = reviewer.history()
        assert held[0] in history and "dev-reviewer approved via page: fine for a dev try" \
            in history
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)


def test_ctrl_c_stops_all_three_and_removes_the_work_directory(dev_gateway: Dev) -> None:
    d = dev_gateway
    workdir = d.workdir
    assert workdir.is_dir() and (workdir / "rules" / "identity.yaml").is_file()
    assert all(_accepts(p) for p in d.ports.values())
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(60) == 0
    assert not workdir.exists()
    assert not list(Path(d.env["TMPDIR"]).glob("agentgate-dev-*"))
    assert not any(_accepts(p) for p in d.ports.values())  # mitmdump child stopped too
    t = d.token()
    assert t.returncode == 1 and t.stdout == ""
    assert "no dev gateway is running" in t.stderr


@pytest.mark.parametrize("var,value", [
    ("AGENTGATE_LISTEN", "0.0.0.0:{port}"),
    ("AGENTGATE_LISTEN", "[::]:{port}"),
    ("AGENTGATE_LISTEN", "example.com:{port}"),
    ("AGENTGATE_DEV_IDP", "192.0.2.1:{port}"),
    ("AGENTGATE_DEV_IDP", "[::1]:{port}"),       # loopback, but not a plain-http issuer
    ("AGENTGATE_DEV_UPSTREAM", "10.0.0.1:{port}"),
    ("AGENTGATE_APPROVALS_LISTEN", "0.0.0.0:{port}"),
])
def test_non_loopback_addresses_are_refused(tmp_path: Path, var: str, value: str) -> None:
    ports = _ports()
    env = _base_env(tmp_path, ports)
    env[var] = value.format(port=free_port())
    r = subprocess.run([AGENTGATE, "dev"], env=env, capture_output=True, text=True,
                       timeout=60, cwd=str(ROOT))
    assert r.returncode == 2
    assert var in r.stderr and ("loopback" in r.stderr or "127.0.0.1" in r.stderr)
    assert not list(tmp_path.glob("agentgate-dev-*"))
    assert not any(_accepts(p) for p in ports.values())
    if var == "AGENTGATE_DEV_IDP":
        t = subprocess.run([AGENTGATE, "token", "dev"], env=env, capture_output=True,
                           text=True, timeout=60)
        assert t.returncode == 2 and var in t.stderr and t.stdout == ""


def test_a_taken_port_names_the_variable(tmp_path: Path) -> None:
    ports = _ports()
    env = _base_env(tmp_path, ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports["idp"]))
        s.listen()
        r = subprocess.run([AGENTGATE, "dev"], env=env, capture_output=True, text=True,
                           timeout=60, cwd=str(ROOT))
    assert r.returncode == 2
    assert "AGENTGATE_DEV_IDP" in r.stderr and "already in use" in r.stderr
    assert not list(tmp_path.glob("agentgate-dev-*"))


def test_token_dev_without_a_dev_gateway(tmp_path: Path) -> None:
    env = _base_env(tmp_path, _ports())
    t = subprocess.run([AGENTGATE, "token", "dev"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert t.returncode == 1 and t.stdout == ""
    assert "no dev gateway is running" in t.stderr and env["AGENTGATE_DEV_IDP"] in t.stderr
    t = subprocess.run([AGENTGATE, "token", "dev", "--ttl", "999999"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert t.returncode == 2 and "--ttl" in t.stderr


def test_default_rules_never_trust_a_local_issuer() -> None:
    rules = load_rules(ROOT / "rules")
    issuers = [i.issuer for i in rules.identity.issuers]
    assert not [i for i in issuers if "127.0.0.1" in i or "localhost" in i or "[::1]" in i]
    assert "8099" not in (ROOT / "rules" / "identity.yaml").read_text()


def test_dev_rules_trust_only_the_dev_idp(tmp_path: Path) -> None:
    class FakeStandin:
        url = "https://127.0.0.1:8443"
    for name, text in dev.dev_rules(FakeStandin(), "http://127.0.0.1:8099").items():
        (tmp_path / name).write_text(text)
    rules = load_rules(tmp_path)
    assert [(i.issuer, i.audiences, i.max_lifetime) for i in rules.identity.issuers] == [
        ("http://127.0.0.1:8099", ("agentgate",), dev.MAX_TTL)]
    assert rules.identity.required
    # with the page: its sign-in at the dev IdP, secret and cookie key from the env only
    page = {"client_id": "c-123", "base": "http://127.0.0.1:8081"}
    for name, text in dev.dev_rules(FakeStandin(), "http://127.0.0.1:8099", page).items():
        (tmp_path / name).write_text(text)
    web = load_rules(tmp_path).approvals.web
    assert (web.client_id, web.issuer, web.redirect_url) == (
        "c-123", "http://127.0.0.1:8099", "http://127.0.0.1:8081/ui/callback")
    assert (web.client_secret_env, web.cookie_secret_env) == (dev.PAGE_SECRET_ENV,
                                                              dev.PAGE_COOKIE_ENV)


def test_run_proxy_help_lists_dev_and_only_its_header() -> None:
    r = subprocess.run([str(ROOT / "run_proxy.sh"), "help"], capture_output=True, text=True,
                       timeout=60, cwd=str(ROOT))
    assert r.returncode == 0
    assert "./run_proxy.sh dev" in r.stdout and "AGENTGATE_DEV_IDP" in r.stdout
    assert "set -euo" not in r.stdout
    assert "\n  dev)\n" in (ROOT / "run_proxy.sh").read_text()


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{d.name}: {cmd}")
    return found


def test_ctrl_c_while_starting_leaves_no_gateway_process_nor_directory(tmp_path: Path) -> None:
    """SIGINT as soon as the gateway's log file exists (opened just before mitmdump is
    spawned), so usually while mitmdump is starting; whenever it lands, nothing may outlive
    `agentgate dev` (mitmdump's command line names the work directory under tmp_path, so any
    survivor is found)."""
    ports = _ports()
    env = _base_env(tmp_path, ports)
    proc = subprocess.Popen([AGENTGATE, "dev"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("agentgate-dev-*/gateway.log")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the gateway was not started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _processes_mentioning(str(tmp_path)) == []
    assert not list(tmp_path.glob("agentgate-dev-*"))

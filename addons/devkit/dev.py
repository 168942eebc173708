"""`agentgate dev` / `./run_proxy.sh dev`: a gateway a newcomer can try locally, with tokens.

It starts the local OIDC provider (idp.py), the stand-in upstream (standin.py) and the
gateway (launch.py), the same pieces `agentgate demo` wires for one run, but on FIXED
loopback ports so the printed env block stays valid across runs, and keeps them running until
Ctrl-C (or SIGTERM): then all three stop and the work directory (rules, CA, DuckDB, logs) is
removed. `agentgate token dev` prints a fresh token from the running dev IdP.

  AGENTGATE_LISTEN        gateway        default 127.0.0.1:8080 (any loopback address)
  AGENTGATE_DEV_IDP       dev IdP        default 127.0.0.1:8099 (127.0.0.1: the rules accept
                                         a plain-http issuer only there)
  AGENTGATE_DEV_UPSTREAM  the stand-in   default 127.0.0.1:8443 (127.0.0.1: its certificate)
  AGENTGATE_APPROVALS_LISTEN  the reviewers' page and approvals API  default 127.0.0.1:8081

The reviewers' page works out of the box: the page is an OAuth client registered at the dev
IdP (a confidential client whose only redirect URL is the page's callback; its secret and
the cookie key are random per run, handed to the gateway in its environment), the dev rules
hold every call for the model `review-me` (rule needs-a-reviewer) for group dev-reviewers,
and the dev IdP offers the reviewer `dev-reviewer` (group dev-reviewers) on its login form.

Why loopback only: the dev IdP signs a token for any subject and group anyone on the machine
asks for; reachable from elsewhere it would hand out identities. The dev rules are written to
the temporary work directory and trust only that IdP; the default rules/ are never touched and
never name it. The gateway gets throwaway upstream keys (never the user's real
OPENAI_API_KEY/ANTHROPIC_API_KEY, which would otherwise be sent to the stand-in).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from addons.devkit.launch import BIN, Gateway, standin_upstreams_yaml, start_gateway

# (env var, default, what it is) per listener.
GATEWAY = ("AGENTGATE_LISTEN", "127.0.0.1:8080", "the gateway")
IDP = ("AGENTGATE_DEV_IDP", "127.0.0.1:8099", "the dev IdP")
UPSTREAM = ("AGENTGATE_DEV_UPSTREAM", "127.0.0.1:8443", "the stand-in upstream")
APPROVALS = ("AGENTGATE_APPROVALS_LISTEN", "127.0.0.1:8081", "the reviewers' page")
REVIEWER = "dev-reviewer"
REVIEWER_GROUP = "dev-reviewers"
HELD_MODEL = "review-me"  # the dev rules hold calls for this model for a reviewer
PAGE_SECRET_ENV = "AGENTGATE_DEV_PAGE_CLIENT_SECRET"
PAGE_COOKIE_ENV = "AGENTGATE_DEV_PAGE_COOKIE_KEY"
AUDIENCE = "agentgate"
MAX_TTL = 3600  # the dev rules' max_lifetime: a dev token is short-lived like a real one
PLACEHOLDER_KEYS = {"OPENAI_API_KEY": "managed-by-agentgate",
                    "ANTHROPIC_API_KEY": "managed-by-agentgate"}
CONNECTOR_LISTEN = "127.0.0.1:8888"  # `agentgate connect`'s default


class DevError(Exception):
    """A problem the user can fix (address, port in use, no dev gateway); printed as is."""


# ---------------------------------------------------------------- addresses
def parse_loopback(spec: tuple[str, str, str], value: str | None = None,
                   only_127_0_0_1: bool = False) -> tuple[str, int]:
    """host:port from the env var (or `value`), refused unless it is a loopback address.

    Names other than `localhost` are refused rather than resolved: what a name resolves to
    can change, a literal cannot."""
    var, default, what = spec
    raw = (value if value is not None else os.environ.get(var) or default).strip()
    host, sep, port_s = raw.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise DevError(f"{var}={raw!r}: {what} needs host:port, e.g. {default}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise DevError(f"{var}={raw!r}: {what} of the dev mode listens on loopback only "
                       f"(127.0.0.0/8, [::1] or localhost): its IdP issues a token to anyone "
                       f"who asks")
    if only_127_0_0_1 and host != "127.0.0.1":
        raise DevError(f"{var}={raw!r}: {what} must be on 127.0.0.1 (the gateway accepts a "
                       f"plain-http issuer and the stand-in's certificate only there)")
    return host, int(port_s)


def netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_free(spec: tuple[str, str, str], host: str, port: int) -> None:
    """Fail before anything starts, naming the variable to change, rather than with a
    traceback from whichever of the three servers hits the taken port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # as the servers bind (SO_REUSEADDR): a listener refuses the bind, connections of
        # a run that just stopped (TIME_WAIT) do not; else a quick restart is refused
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DevError(f"{netloc(host, port)} ({spec[2]}, {spec[0]}) is already in use: is "
                               f"another `agentgate dev` running? Stop it, or pick another "
                               f"port with {spec[0]}=HOST:PORT") from None
            raise DevError(f"cannot listen on {netloc(host, port)} ({spec[0]}): {e}") from None


# ---------------------------------------------------------------- commands
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dev", help="local trial: dev IdP + stand-in upstream + gateway on loopback, until Ctrl-C",
        description="Start a local OIDC provider, the stand-in upstream and the gateway on fixed "
                    "loopback ports (AGENTGATE_LISTEN, AGENTGATE_DEV_IDP, AGENTGATE_DEV_UPSTREAM) "
                    "with rules that route api.openai.com and api.anthropic.com to the stand-in "
                    "and trust only the local IdP. Prints the agent's env block and the token "
                    "command; runs until Ctrl-C, then removes its work directory.")
    p.set_defaults(func=run_dev)
    _register_token_dev(sub)


def _register_token_dev(sub: argparse._SubParsersAction) -> None:
    """`agentgate token dev`, added to identity's `token` group from here, so identity keeps
    no dependency on devkit (the layout rule: devkit is never imported by the gateway)."""
    token = sub.choices.get("token")
    if token is None:  # identity's cli not registered: a stand-alone `token-dev` then
        token_sub = sub
        name = "token-dev"
    else:
        token_sub = next(a for a in token._actions
                         if isinstance(a, argparse._SubParsersAction))
        name = "dev"
    t = token_sub.add_parser(
        name, help="print a fresh token from the running `agentgate dev` IdP",
        description="Print a fresh token (audience agentgate) from the dev IdP of a running "
                    "`agentgate dev` (found at AGENTGATE_DEV_IDP, default 127.0.0.1:8099). "
                    "Only the dev gateway trusts it.")
    t.add_argument("--sub", default="dev-agent", help="the token's subject (default dev-agent)")
    t.add_argument("--groups", default="", help="comma-separated groups, e.g. a,b")
    t.add_argument("--ttl", type=int, default=600,
                   help=f"lifetime in seconds (default 600, at most {MAX_TTL})")
    t.add_argument("--idp", default=None, metavar="HOST:PORT",
                   help="the dev IdP (default $AGENTGATE_DEV_IDP or 127.0.0.1:8099)")
    t.set_defaults(func=run_token_dev)


def _fail(msg: str, code: int = 2) -> int:
    print(f"agentgate: {msg}", file=sys.stderr)
    return code


def _cli() -> list[str]:
    """argv of the `agentgate` command that runs this code, usable from any directory."""
    script = BIN / "agentgate"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "addons.cli"]


def token_command(idp: tuple[str, int]) -> str:
    """The token command for the connector (no shell: it is split with shlex)."""
    argv = [*_cli(), "token", "dev"]
    if netloc(*idp) != IDP[1]:
        argv += ["--idp", netloc(*idp)]
    return shlex.join(argv)


# ---------------------------------------------------------------- agentgate token dev
class _RunningIdP:
    """The IdP of a running `agentgate dev`, seen from another process: DemoIdP's token flow
    (login + authorization code) against its issuer URL, without starting a provider."""

    def __init__(self, issuer: str) -> None:
        from addons.devkit.idp import DemoIdP
        self.issuer = issuer
        self._lock = threading.Lock()
        self._token = DemoIdP.token

    def token(self, **kwargs: Any) -> str:
        return self._token(self, **kwargs)  # type: ignore[arg-type]


def _dev_idp_running(issuer: str) -> bool:
    """Is an OIDC provider with exactly this issuer answering (not just any open port)?"""
    req = urllib.request.Request(  # noqa: S310 - http on 127.0.0.1 only (parse_loopback)
        f"{issuer}/.well-known/openid-configuration")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=5) as resp:
            return json.loads(resp.read(65536)).get("issuer") == issuer
    except (OSError, ValueError, AttributeError):
        return False


def run_token_dev(args: argparse.Namespace) -> int:
    try:
        idp = parse_loopback(IDP, args.idp, only_127_0_0_1=True)
    except DevError as e:
        return _fail(str(e))
    if not 10 <= args.ttl <= MAX_TTL:
        return _fail(f"--ttl must be between 10 and {MAX_TTL} seconds")
    sub = args.sub.strip()
    if not sub:
        return _fail("--sub must not be empty")
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    issuer = f"http://{netloc(*idp)}"
    if not _dev_idp_running(issuer):
        return _fail(f"no dev gateway is running (no dev IdP answers at {issuer}). Start one with "
                     f"`./run_proxy.sh dev` (or `agentgate dev`); if it runs with "
                     f"AGENTGATE_DEV_IDP set, set the same here or pass --idp.", 1)
    try:
        token = _RunningIdP(issuer).token(sub=sub, groups=groups, aud=AUDIENCE,
                                          expires_in=args.ttl)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        return _fail(f"the dev IdP at {issuer} did not issue a token: {e}", 1)
    print(token)
    return 0


# ---------------------------------------------------------------- agentgate dev
def dev_rules(standin: Any, issuer: str, page: dict[str, str] | None = None
              ) -> dict[str, str]:
    """The dev rules; `page` = {"client_id", "base"} adds the reviewers' page sign-in."""
    rules = {
        "upstreams.yaml": standin_upstreams_yaml(standin),
        "identity.yaml": textwrap.dedent(f"""\
            # agentgate dev: trusts only the local dev IdP (never copy this into rules/)
            identity:
              required: true
              issuers:
                - issuer: {issuer}
                  audience: {AUDIENCE}
                  max_lifetime: {MAX_TTL}
            """),
        "policies.yaml": textwrap.dedent(f"""\
            # agentgate dev: a call for model {HELD_MODEL} waits for a reviewer's decision
            policies:
              - name: needs-a-reviewer
                match: {{model: [{HELD_MODEL}]}}
                action: approve
                message: the dev rules hold model {HELD_MODEL} for a reviewer
                approvers: [{REVIEWER_GROUP}]
                timeout: 600
            """),
    }
    if page is not None:
        base = page["base"]
        rules["approvals.yaml"] = textwrap.dedent(f"""\
            # agentgate dev: the reviewers' page signs in at the dev IdP as a client
            # registered there for this run (secret and cookie key: random, in the env)
            approvals:
              link_base: {base}
              web:
                client_id: {page["client_id"]}
                client_secret_env: {PAGE_SECRET_ENV}
                issuer: {issuer}
                redirect_url: {base}/ui/callback
                cookie_secret_env: {PAGE_COOKIE_ENV}
            """)
    return rules


def wait_for_approvals(gw, addr: tuple[str, int], timeout: float = 60) -> None:
    """Return once the gateway's approvals API accepts connections at `addr`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise DevError(f"the gateway exited ({gw.proc.returncode}):\n{gw.logs()[-3000:]}")
        if gw.approvals_url is not None:
            try:
                socket.create_connection(addr, timeout=0.5).close()
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise DevError(f"the reviewers' page did not start listening on {netloc(*addr)} "
                   f"within {timeout:.0f} s (see {gw.log_path})")


def reviewer_block(page_base: str, idp: tuple[str, int]) -> str:
    """How a newcomer reviews a held call: the page, who to sign in as, what gets held."""
    tcmd = token_command(idp) + f" --sub {REVIEWER} --groups {REVIEWER_GROUP}"
    cli = shlex.join(_cli())
    return textwrap.dedent("""\
        Review held calls (rule needs-a-reviewer holds every call for model "{model}"):
          open {base}/ui/ in a browser on this machine; the dev IdP asks who you are:
          click "{reviewer}" under "Predefined users" (group {group}, may decide)
          from the agent's shell above, ask for a held call (it waits), then approve or
          deny it on the page:
          curl -s https://api.openai.com/v1/chat/completions -H 'content-type: application/json' \\
            -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "hello"}}]}}'
          or from a shell: {cli} approvals list --url {base} --token "$({tcmd})"
          (then `approvals approve ID` or `approvals deny ID --reason …` with the same options)
        """).format(model=HELD_MODEL, base=page_base, reviewer=REVIEWER, group=REVIEWER_GROUP,
                    tcmd=tcmd, cli=cli)


def audit_block(db: Path) -> str:
    """Where this run's calls are recorded: the audit commands, with the store named (the
    default `data/agentgate.duckdb` is not this run's: `agentgate audit sessions` there
    shows nothing of it, without saying why)."""
    cli = shlex.join(_cli())
    q = shlex.quote(str(db))
    return textwrap.dedent(f"""\
        What the gateway recorded (this run's audit store; it goes with the work dir):
          {cli} audit sessions --db {q}
          {cli} audit verify --db {q}
          {cli} export --session SESSION_ID --db {q} -o run.mitm
        """)


def env_block(gw: Gateway, idp: tuple[str, int]) -> str:
    cli = shlex.join(_cli())
    tcmd = token_command(idp)
    gateway = f"http://{netloc(gw.host, gw.port)}"
    ca = shlex.quote(str(gw.ca_cert))
    conn = f"http://{CONNECTOR_LISTEN}"
    keys = "\n".join(f"  export {k}={v}" for k, v in PLACEHOLDER_KEYS.items())
    cas = "\n".join(f"  export {k}={ca}" for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
                                                     "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"))
    return textwrap.dedent("""\
        Get a token (a fresh one each time; --sub NAME --groups a,b --ttl SECONDS):
          {tcmd}

        Connect an agent, with the connector (a fresh token on every connection):
          {cli} connect --gateway {gateway} --token-command {qtcmd} &
          export HTTPS_PROXY={conn} HTTP_PROXY={conn}
        {cas}
        {keys}
        or directly (the token is fixed for the agent process's life):
          export HTTPS_PROXY="http://agent:$({tcmd})@{gwnetloc}"
        {cas}
        {keys}
        (placeholder keys: the SDKs need one; the gateway injects the key it holds.
         Node, aiohttp and other clients: docs/CONNECT.md)

        Try it:
          curl -s https://api.openai.com/v1/chat/completions -H 'content-type: application/json' \\
            -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "hello"}}]}}'
        """).format(tcmd=tcmd, qtcmd=shlex.quote(tcmd), cli=cli, gateway=gateway, conn=conn,
                    cas=cas, keys=keys, gwnetloc=netloc(gw.host, gw.port))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_dev(args: argparse.Namespace) -> int:
    try:
        gw_addr = parse_loopback(GATEWAY)
        idp_addr = parse_loopback(IDP, only_127_0_0_1=True)
        up_addr = parse_loopback(UPSTREAM, only_127_0_0_1=True)
        page_addr = parse_loopback(APPROVALS)
        listeners = ((GATEWAY, gw_addr), (IDP, idp_addr), (UPSTREAM, up_addr),
                     (APPROVALS, page_addr))
        if len({netloc(*addr) for _, addr in listeners}) < len(listeners):
            raise DevError("AGENTGATE_LISTEN, AGENTGATE_DEV_IDP, AGENTGATE_DEV_UPSTREAM and "
                           "AGENTGATE_APPROVALS_LISTEN must be four different addresses")
        for spec, (host, port) in listeners:
            _check_free(spec, host, port)
    except DevError as e:
        return _fail(f"dev: {e}")
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the IdP's access log
    # SIGTERM stops cleanly too (a supervisor, `timeout`, a test): same path as Ctrl-C.
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Installed explicitly: a shell starts a background job (`agentgate dev &`) with SIGINT
    # ignored, and Python then leaves it ignored, so `kill -INT` would do nothing.
    signal.signal(signal.SIGINT, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="agentgate-dev-"))
    stack: list[Any] = []
    try:
        return _serve(workdir, gw_addr, idp_addr, up_addr, page_addr, stack)
    except KeyboardInterrupt:
        print("\nagentgate dev: stopping", file=sys.stderr, flush=True)
        return 0
    except DevError as e:
        return _fail(f"dev: {e}", 1)
    finally:
        # Ctrl-C again while stopping must not leave a process or the directory behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for thing in reversed(stack):
            try:
                thing.stop()
            except Exception as e:  # noqa: BLE001 - stop the others regardless
                print(f"agentgate dev: stopping {type(thing).__name__}: {e}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, old_term)
        print(f"agentgate dev: stopped; removed {workdir}", file=sys.stderr, flush=True)


def _serve(workdir: Path, gw_addr: tuple[str, int], idp_addr: tuple[str, int],
           up_addr: tuple[str, int], page_addr: tuple[str, int], stack: list[Any]) -> int:
    from mitmproxy.certs import CertStore

    from addons.devkit.idp import DemoIdP
    from addons.devkit.standin import StandIn

    try:
        idp = DemoIdP(*idp_addr, users={REVIEWER: {"groups": [REVIEWER_GROUP],
                                                   "name": "Dev Reviewer"}}).start()
        stack.append(idp)
        standin = StandIn(*up_addr, certdir=workdir / "standin-certs").start()
        stack.append(standin)
    except OSError as e:  # taken between the check and now
        raise DevError(str(e)) from None
    page_base = f"http://{netloc(*page_addr)}"
    try:
        client = idp.register_client([f"{page_base}/ui/callback"])
    except (OSError, ValueError) as e:
        raise DevError(f"the dev IdP did not register the reviewers' page: {e}") from None
    rules_dir = workdir / "rules"
    rules_dir.mkdir()
    page = {"client_id": client["client_id"], "base": page_base}
    for name, text in dev_rules(standin, idp.issuer, page).items():
        (rules_dir / name).write_text(text)
    confdir = workdir / "certs"
    confdir.mkdir()
    CertStore.from_store(confdir, "mitmproxy", 2048)
    data_dir = workdir / "data"
    data_dir.mkdir()
    # Throwaway keys for the gateway to inject: they override whatever real key the user's
    # environment holds, which must never be sent to the stand-in.
    gateway_env = {"OPENAI_API_KEY": "sk-dev-" + secrets.token_hex(20),
                   "ANTHROPIC_API_KEY": "sk-ant-dev-" + secrets.token_hex(20),
                   "WEBHOOK_TOKEN": "whk-dev-" + secrets.token_hex(12),
                   PAGE_SECRET_ENV: client["client_secret"],
                   PAGE_COOKIE_ENV: secrets.token_hex(32)}
    try:
        gw = start_gateway(rules_dir, confdir, data_dir, workdir / "gateway.log",
                           standin_ca=standin.ca_path, gateway_env=gateway_env,
                           host=gw_addr[0], port=gw_addr[1],
                           approvals_listen=netloc(*page_addr))
    except RuntimeError as e:
        raise DevError(f"the gateway did not start: {e}") from None
    stack.append(gw)
    # The proxy accepts before the approvals API binds (it starts in the gateway's running
    # hook): the printed reviewers' address must answer when the user opens it.
    wait_for_approvals(gw, page_addr)
    print(textwrap.dedent(f"""\
        agentgate dev: running until Ctrl-C (then all three stop and the work directory goes)
          gateway    http://{netloc(gw.host, gw.port)}   (AGENTGATE_LISTEN; trusts only the dev IdP)
          dev IdP    {idp.issuer}   (AGENTGATE_DEV_IDP; audience {AUDIENCE})
          stand-in   {standin.url}   (AGENTGATE_DEV_UPSTREAM; api.openai.com, \
api.anthropic.com and hooks.example.com go here, it answers "echo: <your text>")
          reviewers  {page_base}/ui/   (AGENTGATE_APPROVALS_LISTEN; sign in as \
{REVIEWER}; the approvals API is on the same address)
          work dir   {workdir}   (dev rules, CA, DuckDB, gateway.log)
        """), flush=True)
    print(env_block(gw, idp_addr), flush=True)
    print(audit_block(data_dir / "agentgate.duckdb"), flush=True)
    print(reviewer_block(page_base, idp_addr), flush=True)
    while True:
        if gw.proc.poll() is not None:
            tail = gw.logs()[-3000:]
            raise DevError(f"the gateway exited ({gw.proc.returncode}):\n{tail}")
        time.sleep(0.5)

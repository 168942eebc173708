"""Start real gateway processes: used by the tests, `agentgate demo` and the benchmarks.

A `Gateway` is `mitmdump -s addons/gateway.py` (or mitmweb) on a free 127.0.0.1 port with a
given rules directory, data directory and interception CA.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# Ports handed to a process that binds them later come from below the kernel's ephemeral range:
# connect() takes every client socket's source port from that range, so a port probed free
# there (bind to :0) can be taken by one of a test run's many outgoing connections before the
# gateway or database listener it was meant for binds it ("address already in use"). Each
# process walks its own cursor from a random start; pytest-xdist workers (and the processes
# they start, which inherit the variables) walk disjoint slices, so two workers never probe
# the same port at the same moment.
_PORTS_LOW = 10000
_port_lock = threading.Lock()
_port_cursor: list[int] = []  # [next port to try, slice start, slice end, owner pid]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems start theirs higher still


def _port_slice() -> tuple[int, int]:
    high = min(_ephemeral_low(), 65536)
    try:
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
        workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        worker, workers = 0, 1
    span = (high - _PORTS_LOW) // workers
    start = _PORTS_LOW + (worker % workers) * span
    return start, start + span


def free_port() -> int:
    """A 127.0.0.1 TCP port nothing is bound to now (see above for where it comes from)."""
    with _port_lock:
        if not _port_cursor or _port_cursor[3] != os.getpid():  # a forked child: its own walk
            lo, hi = _port_slice()
            if hi - lo < 100:  # an ephemeral range reaching down here: the kernel's pick
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    return s.getsockname()[1]
            _port_cursor[:] = [random.randrange(lo, hi), lo, hi, os.getpid()]
        port, lo, hi, _ = _port_cursor
        for _ in range(hi - lo):
            candidate = port
            port = lo if port + 1 >= hi else port + 1
            with socket.socket() as s:
                try:  # no SO_REUSEADDR: a port still in TIME_WAIT is skipped too
                    s.bind(("127.0.0.1", candidate))
                except OSError:
                    continue
            _port_cursor[0] = port
            return candidate
        raise OSError(f"no free 127.0.0.1 port in {lo}-{hi - 1}")


def standin_upstreams_yaml(standin) -> str:
    """Upstreams with real public host names, routed to the stand-in by `forward_to`.

    Plain HTTP must be declared (`scheme: http`) and carries no credential: `webhook-http`
    lets tests send `http://hooks.example.com/…` through the proxy."""
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
          - name: webhook-http
            hosts: [hooks.example.com]
            scheme: http
            dialect: webhook
            forward_to: {standin.url}
        """)


class Gateway:
    """A running `mitmdump -s addons/gateway.py` process."""

    def __init__(self, proc: subprocess.Popen, port: int, confdir: Path, rules_dir: Path,
                 data_dir: Path, log_path: Path, host: str = "127.0.0.1") -> None:
        self.proc = proc
        self.host = host
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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{auth}{host}:{self.port}"

    @property
    def approvals_url(self) -> str | None:
        """The reviewers' API address, as the approval addon logged it."""
        import re
        m = re.search(r"approvals API listening at (\S+)", self.logs())
        return m.group(1) if m else None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """Environment for an agent process: nothing but proxy and CA."""
        env = {k: v for k, v in os.environ.items()
               if not k.lower().endswith("_proxy") and not k.endswith("_API_KEY")
               and k not in ("WEBHOOK_TOKEN",)}
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
                  gateway_env: dict[str, str] | None = None,
                  extra_args: tuple[str, ...] = (), web: bool = False,
                  wait: bool = True, script: Path | None = None,
                  host: str = "127.0.0.1", port: int | None = None,
                  approvals_listen: str | None = None) -> Gateway:
    # a fixed host/port for `agentgate dev` (a newcomer's env block stays valid across runs;
    # its reviewers' page needs a fixed address too: the dev IdP knows its redirect URL)
    port = port or free_port()
    args = [str(BIN / ("mitmweb" if web else "mitmdump")),
            "-s", str(script or ROOT / "addons" / "gateway.py"),
            "--listen-host", host, "--listen-port", str(port),
            "--set", f"confdir={confdir}",
            "--set", f"agentgate_rules={rules_dir}",
            "--set", f"agentgate_data={data_dir}",
            "--set", "connection_strategy=lazy",
            "--set", "agentgate_rules_poll_ms=200",
            # each gateway gets its own reviewers' API port, so several can run side by side
            "--set", "agentgate_approvals_listen="
                     + (approvals_listen or f"127.0.0.1:{free_port()}")]
    if web:
        if not any(a.startswith("web_port=") for a in extra_args):  # a caller's (0) wins
            args += ["--set", f"web_port={free_port()}"]
        args += ["--set", "web_open_browser=false"]
    if standin_ca is not None:
        args += ["--set", f"ssl_verify_upstream_trusted_ca={standin_ca}"]
    args += list(extra_args)
    penv = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    penv.update(gateway_env or {})
    penv.update(env or {})
    # SIGTERM drains flows in flight (addons/health) for up to 25 s by default: the tests'
    # and dev's gateways, stopped with flows still held, wait 5 s (an env or --set wins)
    penv.setdefault("AGENTGATE_DRAIN_SECONDS", "5")
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    # Ctrl-C/SIGTERM held while Popen runs: raised inside it (after the fork, while it waits
    # for the exec) the interrupt left a mitmdump nobody had a handle to stop (`agentgate dev`
    # interrupted as it started the gateway; tests/devkit/test_dev.py saw the survivor)
    held: list[int] = []
    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, lambda n, _f: held.append(n))
               for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=penv,
                                cwd=str(ROOT))
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        held[:] = [n for n in held if old.get(n) is not signal.SIG_IGN]  # ignored stays so
        if held and sys.exc_info()[0] is not None:
            os.kill(os.getpid(), held[0])  # Popen failed: the interrupt still goes through
    gw = Gateway(proc, port, confdir, rules_dir, data_dir, log_path, host)
    if held:  # the process exists and has a handle: stop it, then deliver the interrupt
        gw.stop()
        os.kill(os.getpid(), held[0])
    if wait:
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"mitmdump exited {proc.returncode}:\n{gw.logs()}")
                if "proxy listening" in gw.logs():
                    try:
                        socket.create_connection((host, port), timeout=0.5).close()
                        return gw
                    except OSError:
                        pass
                time.sleep(0.05)
        except BaseException:  # Ctrl-C while it starts: the caller has no handle to stop it
            gw.stop()
            raise
        gw.stop()
        raise RuntimeError(f"mitmdump did not start:\n{gw.logs()}")
    return gw

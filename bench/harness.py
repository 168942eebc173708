"""Shared benchmark plumbing: processes, load generation, parsing, memory sampling.

Everything listens on 127.0.0.1 with OS-picked ports and needs no internet. Processes are
started with `Proc` and stopped by their own pid (never by name). Load comes from Debian's
`hey` (Go, keep-alive, `-o csv` gives one row per request, so percentiles are exact);
streamed responses are timed by `ttft()` below, a raw-socket client with no library in the
way, because time to first token is a few hundred microseconds on this machine.
"""

from __future__ import annotations

import base64
import compileall
import csv
import datetime
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEY = shutil.which("hey")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


# ---------------------------------------------------------------- machine facts
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cmd_version(args: Sequence[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else "n/a"


def machine_facts() -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    try:
        import mitmproxy.version
        mitm = mitmproxy.version.VERSION
    except Exception:  # noqa: BLE001 - facts are best effort
        mitm = "n/a"
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_model": model,
        "cores": os.cpu_count() or 0,
        "cores_usable": affinity,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitm,
        "hey": _dpkg_version("hey") if HEY else "not installed",
        "nginx": _dpkg_version("nginx-light") or _dpkg_version("nginx") if NGINX
        else "not installed",
        "loadavg_at_start": _read("/proc/loadavg").split()[:3],
    }


def _dpkg_version(pkg: str) -> str:
    v = _cmd_version(["dpkg-query", "-W", "-f", "${Version}", pkg])
    return v if v and "no packages" not in v.lower() and v != "n/a" else ""


def facts_markdown(f: dict[str, Any]) -> str:
    return "\n".join([
        "| fact | value |", "|---|---|",
        f"| date | {f['date_utc']} |",
        f"| CPU | {f['cpu_model']} |",
        f"| cores | {f['cores']} (usable by this process: {f['cores_usable']}) |",
        f"| RAM | {f['ram_gib']} GiB |",
        f"| kernel | {f['kernel']} |",
        f"| Python | {f['python']} |",
        f"| mitmproxy | {f['mitmproxy']} |",
        f"| hey | {f['hey']} |",
        f"| nginx | {f['nginx'] or 'n/a'} |",
        f"| load average (1/5/15 min) at start | {' '.join(f['loadavg_at_start'])} |",
        *([f"| load average at end | {' '.join(f['loadavg_at_end'])} |"]
          if f.get("loadavg_at_end") else []),
    ])


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Proc:
    """A child process with its log file; stopped by its own pid."""

    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def spawn(name: str, args: Sequence[str], port: int, log_path: Path,
          env: dict[str, str] | None = None, ready: str | None = None,
          timeout: float = 60) -> Proc:
    """Start a process and wait until `ready` appears in its log (if given) and the port
    accepts connections."""
    penv = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    penv.update(env or {})
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(list(args), stdout=log_file, stderr=subprocess.STDOUT, env=penv,
                            cwd=str(ROOT), start_new_session=True)
    log_file.close()
    p = Proc(name, proc, port, log_path)
    deadline = time.monotonic() + timeout
    try:
        if ready:
            while ready not in p.logs():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                       f"{p.logs()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{p.logs()[-3000:]}")
                time.sleep(0.05)
        try:
            wait_port(port, max(1.0, deadline - time.monotonic()), proc)
        except RuntimeError as e:
            raise RuntimeError(f"{name}: {e}:\n{p.logs()[-3000:]}") from None
        if "-s" in args:
            # an addon's start-up error makes mitmdump exit right after it began listening
            time.sleep(0.3)
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                   f"{p.logs()[-3000:]}")
    except BaseException:
        p.stop()
        raise
    return p


# ---------------------------------------------------------------- upstreams
def upstream_certs(certdir: Path) -> tuple[Path, Path, Path]:
    """(ca, leaf, key) for 127.0.0.1/localhost, shared by the stand-in and nginx."""
    from addons.devkit.standin import make_test_ca
    return make_test_ca(certdir)


def start_standin(workdir: Path, certdir: Path, stream_delay: float = 0.0) -> Proc:
    """The stand-in (ThreadingHTTPServer) in its own process, so its GIL is not ours.

    Three changes for benchmarking, made from outside its module: TCP_NODELAY (it writes
    headers and body in two send()s, and Nagle + the client's delayed ACK would add ~40 ms
    to every reply, drowning sub-millisecond differences); SSE events `stream_delay`
    seconds apart (a model's pace, so time to first token differs from time to the end);
    and no request log (it would grow for the whole run).
    """
    port = free_port()
    code = textwrap.dedent(f"""\
        import time, addons.devkit.standin as s
        s._Handler.disable_nagle_algorithm = True
        st = s.StandIn("127.0.0.1", {port}, {str(certdir)!r})
        st.stream_defaults["delay"] = {float(stream_delay)!r}
        st.record = lambda entry: None
        st.start()
        print("stand-in on", st.url, flush=True)
        while True:
            time.sleep(3600)
        """)
    p = spawn("standin", [sys.executable, "-c", code], port, workdir / "standin.log",
              ready="stand-in on")
    p.url = f"https://127.0.0.1:{port}"
    return p


# A canned OpenAI chat completion, what nginx answers to every request.
CANNED_COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": "gpt-4o-mini",
    "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22},
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
        "role": "assistant",
        "content": "Here is a short summary of the ticket: the customer asked for a refund "
                   "of the March invoice and the agent approved it."}}],
}, separators=(",", ":"))


def start_nginx(workdir: Path, certdir: Path, workers: int = 1) -> Proc:
    """nginx as a fast static HTTPS upstream: every request gets CANNED_COMPLETION."""
    if not NGINX:
        raise RuntimeError("nginx is not installed (apt-get install -y nginx-light)")
    _ca, leaf, key = upstream_certs(certdir)
    port = free_port()
    d = workdir / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    body = CANNED_COMPLETION.replace("\\", "\\\\").replace("'", "\\'")
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  client_max_body_size 16m;
  client_body_buffer_size 1m;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {leaf};
    ssl_certificate_key {key};
    location / {{
      default_type application/json;
      return 200 '{body}';
    }}
  }}
}}
""")
    p = spawn("nginx", [NGINX, "-p", str(d), "-c", str(conf), "-g", "daemon off;"],
              port, d / "stdout.log")
    p.url = f"https://127.0.0.1:{port}"
    return p


# ---------------------------------------------------------------- mitmdump
def make_confdir(path: Path) -> Path:
    """mitmproxy's interception CA (RSA key generation takes a moment: do it once)."""
    from mitmproxy.certs import CertStore
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "mitmproxy-ca.pem").exists():
        CertStore.from_store(path, "mitmproxy", 2048)
    return path


_compiled: set[Path] = set()


def compile_addons(root: Path = ROOT) -> None:
    """The gateway's bytecode cached, as run_proxy.sh leaves it (ensure_bytecode) and as
    pip leaves mitmproxy's: a bench run straight from `python -m bench` under
    PYTHONDONTWRITEBYTECODE would otherwise time and weigh the compiler in every suite
    and audit writer start, which bare mitmdump never pays."""
    if root not in _compiled and (root / "addons" / "gateway.py").is_file():
        _compiled.add(root)
        compileall.compile_dir(root / "addons", quiet=2, rx=re.compile("node_modules"))


def start_mitmdump(name: str, workdir: Path, confdir: Path, upstream_ca: Path, *,
                   scripts: Sequence[str] = (), sets: Sequence[str] = (),
                   env: dict[str, str] | None = None, log_level: str = "warn") -> Proc:
    """`mitmdump` on a free port; the client trusts `confdir`'s CA, mitmdump verifies the
    upstream against `upstream_ca` (ssl_verify_upstream_trusted_ca), as in production."""
    for s in scripts:  # (the script's checkout: a base tree runs its own addons/)
        compile_addons(Path(s).resolve().parents[1])
    port = free_port()
    # flow_detail=0: no per-flow line on stdout (Dumper), for every configuration alike
    args = [str(BIN / "mitmdump"), "--set", "flow_detail=0",
            "--set", f"termlog_verbosity={log_level}",
            "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={confdir}",
            "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}",
            "--set", "connection_strategy=lazy"]
    for s in scripts:
        args += ["-s", s]
    for s in sets:
        args += ["--set", s]
    p = spawn(name, args, port, workdir / f"{name}.log", env=env)
    p.url = f"http://127.0.0.1:{port}"
    return p


# ---------------------------------------------------------------- memory
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (peak RSS) in KiB from /proc/PID/status; {} if the process is gone."""
    out: dict[str, int] = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/PID/stat)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process started by `pid`, recursively (the suite's audit writer process)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of its live descendants: work a gateway moves into a
    child process (the audit writer) still counts against it."""
    return cpu_seconds(pid) + sum(cpu_seconds(k) for k in descendants(pid))


def tree_kib(pid: int, key: str = "VmRSS") -> int | None:
    """`key` (VmRSS or VmHWM) of a process plus all of its descendants, in KiB. Memory a
    gateway moves into a child process still counts against it."""
    own = proc_status(pid).get(key)
    if own is None:
        return None
    return own + sum(proc_status(k).get(key) or 0 for k in descendants(pid))


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread (task) of a process: {tid: seconds}."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for tid in tids:
        stat = _read(f"/proc/{pid}/task/{tid}/stat")
        if stat:
            fields = stat.rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a daemon thread."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (monotonic seconds, KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            rss = proc_status(self.pid).get("VmRSS")
            if rss is None:
                return
            self.samples.append((time.monotonic() - t0, rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def rss_drift(samples: Sequence[tuple[float, int]], warmup_fraction: float = 0.2) -> dict:
    """Drift of RSS after warm-up: median of the last 10% of samples against the median of
    the 10% right after warm-up (medians, so one GC pause does not decide it)."""
    if len(samples) < 10:
        return {"drift_pct": None, "samples": len(samples)}
    start = int(len(samples) * warmup_fraction)
    window = max(1, len(samples) // 10)
    early = statistics.median(r for _, r in samples[start:start + window])
    late = statistics.median(r for _, r in samples[-window:])
    return {"samples": len(samples), "early_kib": early, "late_kib": late,
            "max_kib": max(r for _, r in samples),
            "drift_pct": round((late - early) / early * 100, 2) if early else None}


# ---------------------------------------------------------------- hey
@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0                     # non-2xx or transport errors
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    seconds: float = 0.0
    status: dict[str, int] = field(default_factory=dict)
    error_text: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank-with-interpolation percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return 0.0
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo))


def parse_hey_csv(text: str) -> LoadResult:
    """hey `-o csv`: response-time,DNS+dialup,DNS,Request-write,Response-delay,
    Response-read,status-code,offset (seconds, 4 decimals). Error rows have status 0 or
    are missing; hey prints transport errors on stderr."""
    times: list[float] = []
    status: dict[str, int] = {}
    end = 0.0
    start = None
    errors = 0
    for row in csv.reader(io.StringIO(text)):
        if not row or not row[0][:1].isdigit():
            continue  # header
        try:
            rt, code, offset = float(row[0]), row[6], float(row[7])
        except (IndexError, ValueError):
            continue
        status[code] = status.get(code, 0) + 1
        if not code.startswith("2"):
            errors += 1
            continue
        times.append(rt * 1000)
        start = offset if start is None else min(start, offset)
        end = max(end, offset + rt)
    times.sort()
    span = end - (start or 0.0)
    return LoadResult(
        requests=len(times), errors=errors,
        rps=round(len(times) / span, 1) if span > 0 else 0.0,
        p50_ms=round(percentile(times, 50), 3), p90_ms=round(percentile(times, 90), 3),
        p99_ms=round(percentile(times, 99), 3),
        mean_ms=round(statistics.fmean(times), 3) if times else 0.0,
        seconds=round(span, 3), status=status)


def parse_hey_summary(text: str) -> LoadResult:
    """hey's default text summary (Requests/sec, latency distribution, status codes)."""
    res = LoadResult()
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Requests/sec:"):
            res.rps = float(line.split()[1])
        elif line.startswith("Total:") and not res.seconds:
            res.seconds = float(line.split()[1])
        elif line.startswith("Average:") and not res.mean_ms:
            res.mean_ms = round(float(line.split()[1]) * 1000, 3)
        elif line.startswith("Latency distribution"):
            section = "lat"
        elif line.startswith("Status code distribution"):
            section = "status"
        elif line.startswith("Error distribution"):
            section = "errors"
        elif section == "lat" and "% in " in line:
            pct, _, rest = line.partition("% in ")
            value = float(rest.split()[0]) * 1000
            if pct.strip() == "50":
                res.p50_ms = round(value, 3)
            elif pct.strip() == "90":
                res.p90_ms = round(value, 3)
            elif pct.strip() == "99":
                res.p99_ms = round(value, 3)
        elif section == "status" and line.startswith("["):
            code, _, rest = line[1:].partition("]")
            n = int(rest.split()[0])
            res.status[code] = n
            if code.startswith("2"):
                res.requests += n
            else:
                res.errors += n
        elif section == "errors" and line.startswith("["):
            n = int(line[1:].partition("]")[0])
            res.errors += n
            res.error_text = res.error_text or line[:200]
    return res


def hey_args(url: str, *, concurrency: int, seconds: float | None = None,
             requests: int | None = None, proxy: str | None = None,
             body_file: Path | None = None, headers: Iterable[str] = (),
             method: str = "POST", timeout_s: int = 20, csv_out: bool = True,
             rate: float | None = None) -> list[str]:
    if not HEY:
        raise RuntimeError("hey is not installed (apt-get install -y hey)")
    args = [HEY, "-c", str(concurrency), "-m", method, "-t", str(timeout_s),
            "-disable-compression", "-T", "application/json"]
    if seconds is not None:
        args += ["-z", f"{seconds:g}s"]
    else:
        args += ["-n", str(requests or concurrency * 100)]
    if rate:
        args += ["-q", f"{rate:g}"]  # requests per second, per worker
    if proxy:
        args += ["-x", proxy]
    if body_file is not None:
        args += ["-D", str(body_file)]
    for h in headers:
        args += ["-H", h]
    if csv_out:
        args += ["-o", "csv"]
    return args + [url]


def run_hey(url: str, **kw: Any) -> LoadResult:
    args = hey_args(url, **kw)
    limit = (kw.get("seconds") or 60) + 60
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return LoadResult(error_text=f"hey did not finish within {limit}s")
    res = parse_hey_csv(out.stdout) if kw.get("csv_out", True) else \
        parse_hey_summary(out.stdout)
    if out.returncode != 0 or (res.requests == 0 and out.stderr):
        res.error_text = (out.stderr or out.stdout).strip()[-300:]
    elif out.stderr.strip():
        # transport errors (connection reset, timeouts) are printed, not rowed
        res.error_text = out.stderr.strip()[-300:]
    return res


# ---------------------------------------------------------------- bodies
PROSE = (
    "Please summarise the following customer conversation for the support team and list "
    "the open questions. The customer wrote in on Tuesday morning about an invoice that was "
    "charged twice, and asked whether the second payment could be refunded to the original "
    "card. She mentioned that her colleague had already called the billing line last week, "
    "was told the case would be escalated, and never heard back. The order was placed from "
    "the Berlin office and shipped to the warehouse in Hamburg; the delivery note is "
    "attached. Reach her by email at jane.doe@example.com or on +1 415 555 0134 after five. "
    "She would also like to know whether the annual plan can be switched to monthly billing "
    "without losing the loyalty discount, and how long the refund usually takes to appear. "
)


def chat_body(size: int, stream: bool = False, model: str = "gpt-4o-mini") -> bytes:
    """An OpenAI chat request of about `size` bytes of prose-like text (with one email and
    one phone number per ~900 bytes, so the masker has something to do)."""
    text = (PROSE * (size // len(PROSE) + 1))[:max(16, size - 150)]
    body = {"model": model, "messages": [
        {"role": "system", "content": "You are a concise, helpful support assistant."},
        {"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


# ---------------------------------------------------------------- token issuer
class TokenIssuer:
    """A tiny OIDC issuer on http://127.0.0.1: discovery + JWKS, RS256 tokens.

    Used when the test suite's OIDC fixture is not available; it only answers the
    gateway's one-time discovery/JWKS fetches, so it adds no load during a run.
    """

    def __init__(self, audience: str = "agentgate") -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from jose import jwk

        self.audience = audience
        self.kid = "bench-key-1"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._pem = key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
        pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        jwk_pub = jwk.construct(pub.decode(), "RS256").to_dict()
        jwk_pub.update(kid=self.kid, use="sig", alg="RS256")
        self.jwks = {"keys": [{k: (v.decode() if isinstance(v, bytes) else v)
                               for k, v in jwk_pub.items()}]}
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                if self.path.startswith("/.well-known/openid-configuration"):
                    doc = {"issuer": issuer.issuer, "jwks_uri": f"{issuer.issuer}/jwks.json",
                           "id_token_signing_alg_values_supported": ["RS256"]}
                elif self.path.startswith("/jwks.json"):
                    doc = issuer.jwks
                else:
                    self.send_error(404)
                    return
                data = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> TokenIssuer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def token(self, sub: str = "bench-agent", groups: Sequence[str] = ("agents",),
              lifetime: int = 3600, **claims: Any) -> str:
        from jose import jwt
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": self.audience, "sub": sub, "iat": now,
                   "nbf": now - 5, "exp": now + lifetime, "groups": list(groups),
                   "jti": f"bench-{now}-{sub}", **claims}
        return jwt.encode(payload, self._pem, algorithm="RS256", headers={"kid": self.kid})


def basic_proxy_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---------------------------------------------------------------- TTFT client
def _has_content(data: bytes) -> bool:
    """Does this SSE data line carry a non-empty text delta (OpenAI chat chunk)?"""
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    if not isinstance(obj, dict):
        return False
    for choice in obj.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.get("content"):
            return True
    return False


class _Conn:
    """One keep-alive HTTPS connection, direct or tunnelled through an HTTP proxy."""

    def __init__(self, target_host: str, target_port: int, proxy: tuple[str, int] | None,
                 proxy_auth: str | None = None) -> None:
        host, port = proxy or (target_host, target_port)
        sock = socket.create_connection((host, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if proxy:
            req = (f"CONNECT {target_host}:{target_port} HTTP/1.1\r\n"
                   f"Host: {target_host}:{target_port}\r\n")
            if proxy_auth:
                req += f"Proxy-Authorization: {proxy_auth}\r\n"
            sock.sendall((req + "\r\n").encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("proxy closed the connection during CONNECT")
                head += chunk
            if b" 200" not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(f"CONNECT refused: {head.split(b'\r\n', 1)[0]!r}")
        ctx = ssl.create_default_context()
        # like hey: the benchmark measures the proxy, not certificate checks on our side
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(sock, server_hostname=None)
        self.buf = b""
        self.host = f"{target_host}:{target_port}"

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def stream(self, path: str, body: bytes, headers: Sequence[str]) -> tuple[float, float]:
        """POST and read an SSE reply; returns (seconds to the first non-empty content
        delta, seconds to the end of the stream), both from the end of sending."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"content-type: application/json\r\naccept: text/event-stream\r\n"
                f"content-length: {len(body)}\r\n" + "".join(f"{h}\r\n" for h in headers)
                + "\r\n").encode()
        self.sock.sendall(head + body)
        t0 = time.perf_counter()
        status = self._line()
        if b" 200" not in status:
            raise ConnectionError(f"stream request failed: {status!r}")
        chunked, length = False, None
        while line := self._line():
            k, _, v = line.decode("latin-1").partition(":")
            if k.lower() == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
            elif k.lower() == "content-length":
                length = int(v)
        first: float | None = None
        events = b""

        def scan(data: bytes) -> None:
            nonlocal first, events
            if first is not None:
                return
            events += data
            while b"\n\n" in events:
                ev, events = events.split(b"\n\n", 1)
                for ln in ev.split(b"\n"):
                    if ln.startswith(b"data:") and _has_content(ln[5:]):
                        first = time.perf_counter() - t0
                        return

        if chunked:
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                scan(self._exact(size))
                self._exact(2)
        elif length is not None:
            scan(self._exact(length))
        else:
            raise ConnectionError("stream reply without length or chunking")
        end = time.perf_counter() - t0
        return (first if first is not None else end), end

    def request(self, path: str, body: bytes, headers: Sequence[str] = ()
                ) -> tuple[int, dict[str, str], bytes]:
        """POST and read the whole reply: (status, headers (lower-case), body)."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()
        self.sock.sendall(head + body)
        status = int(self._line().split()[1])
        hdrs: dict[str, str] = {}
        while line := self._line():
            k, _, v = line.decode("latin-1").partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            data = b""
            while size := int(self._line().split(b";")[0], 16):
                data += self._exact(size)
                self._exact(2)
            while self._line():
                pass
        else:
            data = self._exact(int(hdrs.get("content-length", "0")))
        return status, hdrs, data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _open(url: str, proxy: str | None, proxy_auth: str | None) -> tuple[_Conn, str]:
    from urllib.parse import urlsplit
    u = urlsplit(url)
    px = None
    if proxy:
        p = urlsplit(proxy)
        px = (p.hostname or "127.0.0.1", p.port or 8080)
        if p.username and not proxy_auth:
            proxy_auth = basic_proxy_auth(p.username, p.password or "")
    return _Conn(u.hostname or "127.0.0.1", u.port or 443, px, proxy_auth), u.path or "/"


def one_request(url: str, body: bytes, *, proxy: str | None = None,
                proxy_auth: str | None = None, headers: Sequence[str] = ()
                ) -> tuple[int, dict[str, str], bytes]:
    """One POST (direct or through a proxy; credentials in the proxy URL are honoured)."""
    conn, path = _open(url, proxy, proxy_auth)
    try:
        return conn.request(path, body, headers)
    finally:
        conn.close()


def ttft(url: str, *, proxy: str | None = None, n: int = 50, body: bytes = b"",
         headers: Sequence[str] = (), proxy_auth: str | None = None,
         warmup: int = 3) -> dict[str, Any]:
    """Time to first token over `n` sequential streamed requests on one keep-alive
    connection (c=1: queueing does not blur the per-request overhead)."""
    conn, path = _open(url, proxy, proxy_auth)
    firsts: list[float] = []
    totals: list[float] = []
    try:
        for i in range(n + warmup):
            f, t = conn.stream(path, body, headers)
            if i >= warmup:
                firsts.append(f * 1000)
                totals.append(t * 1000)
    finally:
        conn.close()
    firsts.sort()
    totals.sort()
    return {"n": len(firsts), "ttft_p50_ms": round(percentile(firsts, 50), 3),
            "ttft_p90_ms": round(percentile(firsts, 90), 3),
            "ttft_mean_ms": round(statistics.fmean(firsts), 3),
            "total_p50_ms": round(percentile(totals, 50), 3)}


def drop_workdir(tmp: Path, workdir: Path | str | None) -> None:
    """Remove a run's temporary directory — unless the caller named it (`workdir`) or
    AGENTGATE_BENCH_KEEP asks to keep it for a look afterwards."""
    if workdir is None and not os.environ.get("AGENTGATE_BENCH_KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)

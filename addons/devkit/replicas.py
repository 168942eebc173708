"""Several gateway processes behind HAProxy, sharing one CA, one rules directory and one
state database: `./run_proxy.sh replicas N` (also the tests and bench/bench_replicas.py).

- Postgres: `$AGENTGATE_STATE` when set; otherwise a throwaway postgres
  (addons/devkit/postgres.py: scram-sha-256 with a random password), stopped on exit.
- N × `mitmdump -s addons/gateway.py`, each on its own loopback port with its own probe
  listener (`AGENTGATE_HEALTH_LISTEN`), reviewers' listener and data directory (each replica
  keeps its own audit DuckDB: DuckDB is one writer per file), `AGENTGATE_STATE` shared.
- HAProxy (Debian's `haproxy`) on the public address in TCP mode (agents speak CONNECT +
  TLS to the gateway: nothing to terminate), round robin, health-checked with
  `GET /readyz` on each replica's probe port (a draining or not-ready replica takes no new
  connections), `option redispatch` + retries (a killed replica's refused connections go to
  another).
- `main()` (the command) also wires the two settings that make replicas one gateway: the
  gateway secret (placeholders sealed in the shared Postgres restore on any replica) and the
  audit lake (every replica's chain in one DuckLake): see cluster_secret() and lake_rules().
Ctrl-C / SIGTERM stops HAProxy, then drains every replica (SIGTERM), then Postgres.
Never imported by the gateway.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from addons.devkit.launch import ROOT, Gateway, free_port, start_gateway
from addons.devkit.postgres import Postgres


class LocalPostgres(Postgres):
    """The throwaway state database (the tests and `replicas` without a DSN):
    addons/devkit/postgres.py's server, scram-sha-256, superuser agentgate with a random
    password; `dsn` is the URL form the gateway's AGENTGATE_STATE takes."""

    def __init__(self) -> None:
        super().__init__(superuser="agentgate", password=secrets.token_urlsafe(18),
                         prefix="agentgate-state-")

    def start(self) -> LocalPostgres:
        super().start()
        return self

    @property
    def dsn(self) -> str:
        return (f"postgresql://agentgate:{self.password}@127.0.0.1:{self.port}/postgres"
                "?connect_timeout=3")


MIN_SECRET_BYTES = 16  # addons/masking/sessionstore.py's minimum


def cluster_secret(data_dir: Path) -> Path:
    """The local cluster's gateway secret: `<data>/replicas-secret`, created 0600 with 32
    random bytes (hex) on first use and reused after (placeholders sealed under it in an
    $AGENTGATE_STATE database stay readable across restarts). Never printed."""
    path = data_dir / "replicas-secret"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if len(path.read_text(encoding="utf-8").strip().encode()) < MIN_SECRET_BYTES:
            raise RuntimeError(f"{path}: shorter than {MIN_SECRET_BYTES} bytes; remove it and "
                               "a new one is generated") from None
        os.chmod(path, 0o600)  # a copied file may have come with wider modes
        return path
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


LAKE_RULES_FILE = "zz-replicas-audit-lake.yaml"


def sync_overlay(rules_dir: Path, out: Path) -> None:
    """Mirror the user's rules files into the overlay as symlinks: an edited file reloads
    through its link (the gateway's poll follows it), a new or removed file appears or goes
    here on the next call (main() calls it every half second)."""
    from addons.config.loader import rule_files
    try:
        want = {f.name: f.resolve() for f in rule_files(rules_dir) if f.name != LAKE_RULES_FILE}
    except OSError:
        return  # the directory is gone or unreadable for a moment: keep the last mirror
    for link in out.iterdir():
        if link.is_symlink() and link.name not in want:
            link.unlink(missing_ok=True)
    for name, target in want.items():
        link = out / name
        if link.is_symlink() and link.readlink() == target:
            continue
        tmp = out / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(link)  # atomic: the gateway never sees the file missing


def lake_rules(rules_dir: Path, dsn: str, lake_data: Path, workdir: Path) -> Path:
    """A rules directory for the replicas: the user's files (symlinked, so edits reload;
    sync_overlay() keeps the set current) plus an `audit_lake:` with its catalog in the state
    Postgres and Parquet under `lake_data`.
    The user's rules are used as they are when they set `audit_lake:` themselves (or cannot
    be read: the gateways then report why). The DSN's password lands only in this 0600 file
    inside the 0700 work directory, removed at stop."""
    from addons.config.loader import ConfigError, load_rules
    try:
        if load_rules(rules_dir).audit_lake is not None:
            return rules_dir
    except ConfigError:
        return rules_dir
    if (rules_dir / LAKE_RULES_FILE).exists():
        raise RuntimeError(f"{rules_dir / LAKE_RULES_FILE}: that name is the replicas' own "
                           "audit_lake file; rename yours")
    out = workdir / "rules"
    out.mkdir(mode=0o700)
    sync_overlay(rules_dir, out)
    lake_data.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LAKE_RULES_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# written by ./run_proxy.sh replicas: every replica ships its audit here\n"
                f"audit_lake:\n  catalog: {json.dumps(dsn)}\n"
                f"  data: {json.dumps(str(lake_data.resolve()))}\n  interval_s: 1\n")
    return out


def haproxy_config(listen: tuple[str, int], backends: list[tuple[str, int, int]],
                   check_ms: int = 500) -> str:
    """TCP load balancing over (name, proxy port, probe port) on 127.0.0.1."""
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{port} check port {probe} inter {check_ms} "
        "fall 2 rise 1" for name, port, probe in backends)
    return f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 15m
    timeout server 15m
    retries 3
    option redispatch
frontend agents
    bind {listen[0]}:{listen[1]}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
{servers}
"""


class HAProxy:
    def __init__(self, listen: tuple[str, int], backends: list[tuple[str, int, int]],
                 workdir: Path) -> None:
        self.listen = listen
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(haproxy_config(listen, backends))
        self.log_path = workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(exe):
            raise RuntimeError("haproxy not found (Debian: apt-get install haproxy)")
        subprocess.run([exe, "-c", "-q", "-f", str(self.cfg)], check=True, timeout=30)
        self.proc = subprocess.Popen([exe, "-db", "-f", str(self.cfg)],
                                     stdout=open(self.log_path, "wb"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT)
        # started is not listening: a client right after start (the tests, a user reading
        # "Ctrl-C stops everything") was refused on a loaded machine
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.proc.returncode}: "
                                   + self.log_path.read_text(errors="replace")[-2000:])
            try:
                socket.create_connection(self.listen, timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"haproxy is not listening on {self.listen}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Replica:
    name: str
    gateway: Gateway
    probe_port: int

    def ready(self) -> bool:
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{self.probe_port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


@dataclass
class Cluster:
    replicas: list[Replica]
    haproxy: HAProxy | None
    postgres: LocalPostgres | None
    dsn: str
    workdir: Path
    extra: list[Replica] = field(default_factory=list)
    rules_dir: Path | None = None  # what the replicas load (with the lake: workdir/rules)
    lake_data: Path | None = None  # the Parquet of a lake whose catalog is in `postgres`

    @property
    def port(self) -> int:
        assert self.haproxy is not None
        return self.haproxy.listen[1]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(r.ready() for r in self.replicas):
            if time.monotonic() > deadline:
                raise RuntimeError("replicas not ready: " + ", ".join(
                    r.name for r in self.replicas if not r.ready()))
            time.sleep(0.1)

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for r in self.replicas:
            r.gateway.stop(signal.SIGTERM, timeout=40)
        if self.postgres is not None:
            self.postgres.stop()
            if self.lake_data is not None:  # its catalog died with the throwaway postgres
                shutil.rmtree(self.lake_data, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)  # logs, haproxy.cfg, lake rules


def start_replica(name: str, rules_dir: Path, confdir: Path, data_dir: Path, dsn: str,
                  workdir: Path, *, standin_ca: Path | None = None,
                  gateway_env: dict[str, str] | None = None,
                  extra_args: tuple[str, ...] = ()) -> Replica:
    probe = free_port()
    d = data_dir / name
    d.mkdir(parents=True, exist_ok=True)
    gw = start_gateway(rules_dir, confdir, d, workdir / f"{name}.log", standin_ca=standin_ca,
                       gateway_env={**(gateway_env or {}), "AGENTGATE_STATE": dsn,
                                    "AGENTGATE_REPLICA": name,
                                    "AGENTGATE_HEALTH_LISTEN": f"127.0.0.1:{probe}"},
                       extra_args=extra_args)
    deadline = time.monotonic() + 30  # the probe listener opens once mitmproxy runs
    while True:
        try:
            socket.create_connection(("127.0.0.1", probe), timeout=0.5).close()
            return Replica(name, gw, probe)
        except OSError:
            if gw.proc.poll() is not None or time.monotonic() > deadline:
                gw.stop(signal.SIGKILL)
                raise RuntimeError(f"replica {name}: no probe listener:\n{gw.logs()[-3000:]}"
                                   ) from None
            time.sleep(0.05)


def start_cluster(n: int, rules_dir: Path, confdir: Path, data_dir: Path, *,
                  listen: tuple[str, int] | None = None, dsn: str | None = None,
                  standin_ca: Path | None = None, gateway_env: dict[str, str] | None = None,
                  extra_args: tuple[str, ...] = (), balancer: bool = True,
                  wait: bool = True, shared_secret: bool = False,
                  lake_data: Path | None = None) -> Cluster:
    """`shared_secret`: unless the environment names one, every replica gets
    AGENTGATE_SECRET_FILE=cluster_secret(data_dir); `lake_data`: unless the rules set
    `audit_lake:`, the replicas ship to a lake in the state Postgres with Parquet there."""
    workdir = Path(tempfile.mkdtemp(prefix="agentgate-replicas-"))
    pg = None
    dsn = dsn or os.environ.get("AGENTGATE_STATE", "").strip() or None
    if dsn is None:
        pg = LocalPostgres().start()
        dsn = pg.dsn
    replicas: list[Replica] = []
    try:
        gateway_env = dict(gateway_env or {})
        if shared_secret and not (os.environ.get("AGENTGATE_SECRET")
                                  or os.environ.get("AGENTGATE_SECRET_FILE")
                                  or "AGENTGATE_SECRET" in gateway_env
                                  or "AGENTGATE_SECRET_FILE" in gateway_env):
            gateway_env["AGENTGATE_SECRET_FILE"] = str(cluster_secret(data_dir).resolve())
        if lake_data is not None:
            own = lake_rules(rules_dir, dsn, lake_data, workdir)
            if own != rules_dir and pg is not None:
                # our lake, a new catalog: Parquet left by a killed run belongs to none
                shutil.rmtree(lake_data, ignore_errors=True)
                lake_data.mkdir(parents=True)
            rules_dir = own
        for i in range(n):
            replicas.append(start_replica(f"gw{i + 1}", rules_dir, confdir, data_dir, dsn,
                                          workdir, standin_ca=standin_ca,
                                          gateway_env=gateway_env, extra_args=extra_args))
        ha = None
        if balancer:
            ha = HAProxy(listen or ("127.0.0.1", free_port()),
                         [(r.name, r.gateway.port, r.probe_port) for r in replicas],
                         workdir).start()
        cluster = Cluster(replicas, ha, pg, dsn, workdir, rules_dir=rules_dir,
                          lake_data=lake_data if rules_dir == workdir / "rules" else None)
        if wait:
            cluster.wait_ready()
        return cluster
    except BaseException:
        for r in replicas:
            r.gateway.stop(signal.SIGKILL)
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="run_proxy.sh replicas",
                                 description="N gateway replicas behind HAProxy")
    ap.add_argument("n", type=int, nargs="?", default=2, help="replicas (2-8, default 2)")
    ap.add_argument("--listen", default=os.environ.get("AGENTGATE_LISTEN", "127.0.0.1:8080"))
    ap.add_argument("--rules", default=os.environ.get("AGENTGATE_RULES", str(ROOT / "rules")))
    ap.add_argument("--data", default=os.environ.get("AGENTGATE_DATA", str(ROOT / "data")))
    ap.add_argument("--certs", default=str(ROOT / "certs"))
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # what follows goes to every mitmdump (--set …)
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    a = ap.parse_args(argv)
    if not 1 <= a.n <= 8:
        ap.error("between 1 and 8 replicas")
    host, _, port = a.listen.rpartition(":")
    cluster = start_cluster(a.n, Path(a.rules), Path(a.certs), Path(a.data),
                            listen=(host or "127.0.0.1", int(port)), wait=False,
                            extra_args=tuple(extra), shared_secret=True,
                            lake_data=Path(a.data) / "lake")
    try:
        cluster.wait_ready(60)
    except RuntimeError as e:  # e.g. the rules' identity provider is not reachable yet
        print(f"agentgate: {e}; HAProxy sends them nothing until /readyz says 200",
              file=sys.stderr)
    print(f"agentgate: {a.n} replicas behind HAProxy at {a.listen}; shared state "
          f"{'in a throwaway postgres' if cluster.postgres else 'in $AGENTGATE_STATE'}",
          file=sys.stderr)
    for r in cluster.replicas:
        print(f"  {r.name}: proxy 127.0.0.1:{r.gateway.port}, probes "
              f"http://127.0.0.1:{r.probe_port}/readyz, log {r.gateway.log_path}",
              file=sys.stderr)
    secret = ("$AGENTGATE_SECRET" if os.environ.get("AGENTGATE_SECRET") else
              "$AGENTGATE_SECRET_FILE" if os.environ.get("AGENTGATE_SECRET_FILE") else
              f"{Path(a.data) / 'replicas-secret'} (0600)")
    print(f"  placeholders restore on any replica: sealed in the state database under the "
          f"secret in {secret}", file=sys.stderr)
    assert cluster.rules_dir is not None
    if cluster.lake_data is not None or cluster.rules_dir != Path(a.rules):
        where = (f"catalog in the state database, Parquet in {Path(a.data) / 'lake'}"
                 + (" (both gone at stop; each replica's own audit stays in its data dir)"
                    if cluster.postgres else ""))
    else:
        where = "the rules' audit_lake"
    rules_env = f"AGENTGATE_RULES={shlex.quote(str(cluster.rules_dir))} "
    print(f"  audit lake: {where}; every replica's audit, from the repository:\n"
          f"    {rules_env}./run_proxy.sh cli audit verify --lake\n"
          f"    {rules_env}./run_proxy.sh cli audit sessions --lake", file=sys.stderr)
    print(f"  export HTTPS_PROXY=http://{a.listen} SSL_CERT_FILE={a.certs}/"
          "mitmproxy-ca-cert.pem   (Ctrl-C stops everything)", file=sys.stderr)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with contextlib.suppress(KeyboardInterrupt):
        while not stop:
            time.sleep(0.5)
            if cluster.rules_dir != Path(a.rules):
                sync_overlay(Path(a.rules), cluster.rules_dir)
    print("agentgate: stopping (replicas drain)", file=sys.stderr)
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

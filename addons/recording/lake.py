"""The audit lake: every replica's hash chain, shipped in sealed segments to one DuckLake.

Each replica keeps recording into its own local DuckDB (fast, fail closed: addons/recording/
writer.py, in the writer process). A shipper thread (in that process, beside the writer)
copies what the local store has committed to a DuckLake
(catalog in Postgres, or a local DuckDB catalog file for one host; data as Parquet files in a
directory), off the event loop, in segments:

  a segment is a contiguous range of one replica's chain (seq first..last), sealed by the
  prev_hash of its first record and the hash of its last one, written in one lake
  transaction together with the replica's new head (`lake.chains`).

Shipping is idempotent: where to go on is read from the lake (the replica's head there), not
remembered, so a retry after a commit whose answer was lost ships nothing twice. A local chain
that does not continue the lake's (the local store was replaced under the same replica name)
is not shipped: the shipper logs why and waits, and `agentgate audit verify --lake` would
report the gap anyway.

`verify()` walks every replica's chain across its segments: an edited record, a missing or
edited segment (a gap in seq or hashes), records outside any segment and a lake head that the
segments do not reach are each reported. The lake schema is docs/SCHEMA.md's `flows` plus a
`replica` column, and `segments` / `chains`.

DuckDB extensions come from PyPI packages (duckdb-extension-ducklake, -postgres) built for
exactly the installed duckdb; they are loaded from the package's file, never downloaded.
No mitmproxy import: the CLI, the tests and the bench use this module as the gateway does.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.config.schema import MapSection, expect_int, expect_map, expect_number, expect_str
from addons.recording import store

log = logging.getLogger("agentgate.recording.lake")

KEYS = {"catalog", "data", "replica", "interval_s", "segment_rows"}
LAKE = "lake"  # the catalog's name inside a lake connection
PG_PREFIXES = ("postgresql://", "postgres://", "postgres:")

# The recorder's columns: with content-addressed bodies (schema 2) the body references too.
COLUMNS: tuple[tuple[str, str], ...] = store.ALL_COLUMNS
NAMES = tuple(c for c, _ in COLUMNS)
TIMESTAMPS = frozenset(c for c, t in COLUMNS if t == "TIMESTAMP")
REFS = store.REF_NAMES  # every column that holds a `blobs` address

LAKE_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {LAKE}.flows (replica VARCHAR, "
    + ", ".join(f"{c} {t}" for c, t in COLUMNS) + ");"
    f"CREATE TABLE IF NOT EXISTS {LAKE}.blobs (hash VARCHAR, data BLOB, prev VARCHAR, "
    "part VARCHAR, size BIGINT);"
    f"CREATE TABLE IF NOT EXISTS {LAKE}.segments (replica VARCHAR, first_seq BIGINT, "
    "last_seq BIGINT, first_prev_hash VARCHAR, last_hash VARCHAR, rows BIGINT, "
    "shipped_at TIMESTAMP);"
    f"CREATE TABLE IF NOT EXISTS {LAKE}.chains (replica VARCHAR, first_seq BIGINT, "
    "first_prev_hash VARCHAR, last_seq BIGINT, last_hash VARCHAR, updated TIMESTAMP);"
)
# Built from the constant column list only (no outside input).
_COLS = ", ".join(NAMES)
_UNNEST = ", ".join(f"CAST(unnest(?) AS {t})" for _c, t in COLUMNS)
INSERT_LAKE_FLOWS = (f"INSERT INTO {LAKE}.flows (replica, {_COLS}) "  # noqa: S608
                     f"SELECT ?, {_UNNEST}")
SELECT_LOCAL = f"SELECT {_COLS} FROM flows WHERE seq > ? ORDER BY seq LIMIT ?"  # noqa: S608
# The blobs a range of records refers to, with every node and part below them.
_ROOTS = " UNION ".join(
    f"SELECT {c} FROM flows WHERE seq BETWEEN ? AND ? AND {c} IS NOT NULL"  # noqa: S608
    for c in REFS)
SELECT_LOCAL_BLOBS = f"""
WITH RECURSIVE r(h) AS (
    {_ROOTS}
    UNION
    SELECT x FROM (SELECT unnest([b.prev, b.part]) AS x FROM r JOIN blobs b ON b.hash = r.h)
    WHERE x IS NOT NULL
)
SELECT b.hash, b.data, b.prev, b.part, b.size FROM blobs b JOIN r ON b.hash = r.h
"""  # noqa: S608
INSERT_LAKE_BLOBS = (
    f"INSERT INTO {LAKE}.blobs SELECT * FROM (SELECT CAST(unnest(?) AS VARCHAR) AS hash, "  # noqa: S608
    "CAST(unnest(?) AS BLOB), CAST(unnest(?) AS VARCHAR), CAST(unnest(?) AS VARCHAR), "
    f"CAST(unnest(?) AS BIGINT)) n WHERE n.hash NOT IN (SELECT hash FROM {LAKE}.blobs)")


class LakeError(Exception):
    """The lake cannot be reached, attached or read; the message names no credential."""


@dataclass(frozen=True)
class LakeConfig:
    catalog: str                 # postgresql://… (or postgres:<libpq conninfo>) or a file path
    data: str | None = None      # Parquet directory (s3://… named as possible, not tested)
    replica: str | None = None   # this replica's chain name; default: host + local store path
    interval_s: float = 5.0
    segment_rows: int = 10_000

    @property
    def on_postgres(self) -> bool:
        return self.catalog.startswith(PG_PREFIXES)

    def data_path(self) -> str | None:
        if self.data:
            return self.data
        if not self.on_postgres:
            return self.catalog + ".files"
        return None

    def describe(self) -> str:
        where = "Postgres catalog" if self.on_postgres else f"catalog {self.catalog}"
        return (f"audit lake: {where}, data {self.data_path() or '(from the catalog)'}, "
                f"segments of up to {self.segment_rows} every {self.interval_s:g} s")


def parse_lake(section: MapSection) -> LakeConfig | None:
    """The top-level `audit_lake:` section; None when absent (no lake, as before)."""
    if not section.data:
        return None
    d = expect_map(section.data, section.where(), KEYS)
    w = section.where
    if "catalog" not in d:
        raise w().error("catalog is required (postgresql://… or a .ducklake file path)")
    kw: dict[str, Any] = {"catalog": expect_str(d["catalog"], w("catalog"))}
    if d.get("data") is not None:
        kw["data"] = expect_str(d["data"], w("data"))
    elif kw["catalog"].startswith(PG_PREFIXES):
        raise w("data").error("required with a Postgres catalog (a directory every replica "
                              "reaches, or an s3:// prefix)")
    if d.get("replica") is not None:
        kw["replica"] = expect_str(d["replica"], w("replica"))
        if not re.fullmatch(r"[A-Za-z0-9._:/-]{1,200}", kw["replica"]):
            raise w("replica").error("letters, digits and . _ : / - only (1-200)")
    if "interval_s" in d:
        kw["interval_s"] = expect_number(d["interval_s"], w("interval_s"), minimum=0.05,
                                         maximum=3600)
    if "segment_rows" in d:
        kw["segment_rows"] = expect_int(d["segment_rows"], w("segment_rows"), minimum=1,
                                        maximum=1_000_000)
    return LakeConfig(**kw)


def default_replica(db_path: str | Path) -> str:
    """Host name plus a digest of the local store's path: unique per pod (host names) and
    per process on one host (each has its own store), stable across restarts."""
    digest = hashlib.sha256(str(Path(db_path).resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


# ---------------------------------------------------------------- connecting
def redact_catalog(text: str, catalog: str) -> str:
    """An error text without the catalog's credentials (DuckDB may echo the whole target)."""
    out = text.replace(catalog, redacted_catalog(catalog))
    return re.sub(r"(password\s*=\s*)\S+", r"\1[REDACTED]", out, flags=re.IGNORECASE)


def redacted_catalog(catalog: str) -> str:
    out = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1[REDACTED]@", catalog)
    return re.sub(r"(password\s*=\s*)\S+", r"\1[REDACTED]", out, flags=re.IGNORECASE)


_EXT_LOCK = threading.Lock()
_EXT_DIR: list[str] = []


def extension_file(module: str, name: str, entry: str) -> str:
    """Path of an extension shipped by a PyPI package, named as DuckDB expects to LOAD it.

    DuckDB derives the init function from the file name (postgres's is `postgres_scanner`),
    so a differently named file is linked under the entry name in a private directory."""
    import duckdb
    version = "v" + duckdb.__version__
    try:
        path = (importlib.resources.files(module) / "extensions" / version
                / f"{name}.duckdb_extension")
    except ModuleNotFoundError:
        raise LakeError(f"the Python package {module.replace('_', '-')}=={duckdb.__version__} "
                        "is not installed (DuckDB extensions are not downloaded at run time)"
                        ) from None
    if not Path(str(path)).is_file():
        raise LakeError(f"{module.replace('_', '-')} has no build for duckdb {version} "
                        "(install the version matching duckdb)")
    if entry == name:
        return str(path)
    with _EXT_LOCK:
        if not _EXT_DIR:
            _EXT_DIR.append(tempfile.mkdtemp(prefix="agentgate-duckdb-ext-"))
        link = Path(_EXT_DIR[0]) / f"{entry}.duckdb_extension"
        if not link.exists():
            link.symlink_to(str(path))
    return str(link)


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _pg_target(catalog: str) -> str:
    # DuckLake takes `postgres:<conninfo>`; libpq reads a postgresql:// URI as conninfo too.
    if catalog.startswith("postgres:") and not catalog.startswith("postgres://"):
        return "ducklake:" + catalog
    return "ducklake:postgres:" + catalog


def connect(cfg: LakeConfig, read_only: bool = False) -> Any:
    """A fresh in-memory DuckDB with the lake attached as `lake` (schema created when
    writing). Its own instance: the local store's instance has external access off."""
    import duckdb
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False,
                                             "threads": 2, "memory_limit": "256MB"})
    try:
        if cfg.on_postgres:
            pg = extension_file("duckdb_extension_postgres", "postgres", "postgres_scanner")
            con.execute(f"LOAD {_lit(pg)}")
        dl = extension_file("duckdb_extension_ducklake", "ducklake", "ducklake")
        con.execute(f"LOAD {_lit(dl)}")
    except LakeError:
        con.close()
        raise
    except Exception as e:  # noqa: BLE001 - duckdb raises several types here
        con.close()
        raise LakeError(f"cannot load the DuckLake extension: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    try:
        attach(con, cfg, read_only)
    except BaseException:
        con.close()
        raise
    return con


def attach(con: Any, cfg: LakeConfig, read_only: bool = False) -> None:
    """Attach the lake as `lake` on a connection of connect() (again after detach())."""
    try:
        target = _pg_target(cfg.catalog) if cfg.on_postgres else "ducklake:" + cfg.catalog
        opts = []
        data = cfg.data_path()
        if data and not read_only:
            if "://" not in data:
                Path(data).mkdir(parents=True, exist_ok=True)
            opts.append(f"DATA_PATH {_lit(data)}")
        if read_only:
            opts.append("READ_ONLY")
        if not cfg.on_postgres and read_only and not Path(cfg.catalog).exists():
            raise LakeError(f"no lake catalog at {cfg.catalog}")
        con.execute(f"ATTACH {_lit(target)} AS {LAKE}"
                    + (f" ({', '.join(opts)})" if opts else ""))
        if not read_only:
            con.execute(LAKE_SCHEMA)
            # lakes made before a reference column existed (schema 3: certs_ref) get it;
            # only when missing (an ALTER is a new lake schema version for every reader)
            have = _lake_columns(con)
            for c, t in store.REF_COLUMNS:
                if c not in have:
                    con.execute(f"ALTER TABLE {LAKE}.flows ADD COLUMN {c} {t}")
    except LakeError:
        raise
    except Exception as e:  # noqa: BLE001 - duckdb raises several types here
        with contextlib.suppress(Exception):
            con.execute(f"DETACH DATABASE IF EXISTS {LAKE}")
        first = str(e).splitlines()[0] if str(e) else ""
        raise LakeError(redact_catalog(f"cannot attach the audit lake "
                                       f"{redacted_catalog(cfg.catalog)}: "
                                       f"{type(e).__name__}: {first}"[:600], cfg.catalog)
                        ) from None


# ---------------------------------------------------------------- shipping
def lake_head(lake: Any, replica: str) -> tuple[int, str] | None:
    r = lake.execute(f"SELECT last_seq, last_hash FROM {LAKE}.chains WHERE replica = ?",  # noqa: S608
                     [replica]).fetchone()
    return (int(r[0]), r[1]) if r else None


def ship_segment(local: Any, lake: Any, replica: str, max_rows: int) -> int:
    """Ship the next segment of local's chain (at most max_rows records); returns how many
    records it sealed (0: nothing new). Raises LakeError when the local chain does not
    continue the lake's; other errors (lake unreachable, a conflict) propagate for a retry."""
    head = lake_head(lake, replica)
    after = head[0] if head else 0
    if head:
        at = local.execute("SELECT hash FROM flows WHERE seq = ?", [head[0]]).fetchone()
        top = local.execute("SELECT max(seq) FROM flows").fetchone()[0]
        if (at is not None and at[0] != head[1]) or (top is not None and top < head[0]):
            raise LakeError(f"the local audit store does not continue the lake's chain of "
                            f"replica {replica!r} (lake head seq {head[0]}): a replaced local "
                            "store needs a new audit_lake.replica")
    cur = local.execute(SELECT_LOCAL, [after, max_rows])
    rows = cur.fetchall()
    if not rows:
        return 0
    i_seq, i_prev, i_hash = NAMES.index("seq"), NAMES.index("prev_hash"), NAMES.index("hash")
    first, last = rows[0], rows[-1]
    if head and first[i_prev] != head[1]:
        purged = (first[i_seq] > head[0] + 1 and local.execute(
            "SELECT count(*) FROM flows WHERE seq <= ?", [head[0]]).fetchone()[0] == 0)
        if not purged:
            raise LakeError(f"replica {replica!r}: local record seq {first[i_seq]} is not "
                            f"chained to the lake's head seq {head[0]}")
        # Local retention purged records the lake never got (it was unreachable that long):
        # they are lost to the lake; ship on, and `audit verify --lake` reports the gap.
        log.error("agentgate: audit lake: replica %s records seq %d..%d were purged locally "
                  "before they were shipped; the lake will show the gap", replica,
                  head[0] + 1, first[i_seq] - 1)
    columns = [list(col) for col in zip(*rows, strict=True)]
    blobs = local.execute(SELECT_LOCAL_BLOBS, [first[i_seq], last[i_seq]] * len(REFS)).fetchall()
    lake.execute("BEGIN TRANSACTION")
    try:
        # Re-read the head inside the transaction: two shippers of one replica conflict
        # here or at COMMIT instead of both sealing the same range.
        again = lake_head(lake, replica)
        if again != head:
            lake.execute("ROLLBACK")
            return 0
        lake.execute(INSERT_LAKE_FLOWS, [replica, *columns])
        if blobs:
            lake.execute(INSERT_LAKE_BLOBS, [list(c) for c in zip(*blobs, strict=True)])
        lake.execute(f"INSERT INTO {LAKE}.segments VALUES (?, ?, ?, ?, ?, ?, "  # noqa: S608
                     "make_timestamp(?))",
                     [replica, first[i_seq], last[i_seq], first[i_prev], last[i_hash],
                      len(rows), store.micros(time.time())])
        if head is None:
            lake.execute(f"INSERT INTO {LAKE}.chains VALUES (?, ?, ?, ?, ?, "  # noqa: S608
                         "make_timestamp(?))",
                         [replica, first[i_seq], first[i_prev], last[i_seq], last[i_hash],
                          store.micros(time.time())])
        else:
            lake.execute(f"UPDATE {LAKE}.chains SET last_seq = ?, last_hash = ?, "  # noqa: S608
                         "updated = make_timestamp(?) WHERE replica = ?",
                         [last[i_seq], last[i_hash], store.micros(time.time()), replica])
        lake.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            lake.execute("ROLLBACK")
        raise
    return len(rows)


class LakeShipper:
    """Ships a local audit store's new records to the lake from its own thread.

    `open_local` returns a connection to the local store (the recorder's DuckDB; in the
    writer process, another connection to the writer's instance). Errors back off (1 s doubling to
    60 s) and are logged without the catalog's credentials; flows are never held for the
    lake: the local store is the fail-closed one."""

    def __init__(self, cfg: LakeConfig, replica: str, open_local: Callable[[], Any],
                 reading: Callable[[], contextlib.AbstractContextManager[Any]]
                 = contextlib.nullcontext) -> None:
        self.cfg = cfg
        self.replica = replica
        self._open_local = open_local
        # held while a round reads the local store (AuditWriter.reading: in the writer
        # process the instance then has the readers' memory_limit)
        self._reading = reading
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lake: Any = None
        self._local: Any = None
        self._shipped_to: int | None = None  # the lake's head seq after the last round
        self._attached = False
        self.shipped = 0
        self.segments = 0
        self.last_error: str | None = None
        self.last_ok: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agentgate-lake", daemon=True)
        self._thread.start()

    def ship_all(self) -> int:
        """Ship everything committed locally now (in segments); returns records shipped."""
        with self._reading():
            return self._ship_all()

    def _ship_all(self) -> int:
        # the local connection lives for one round: in the writer process it is a cursor
        # of the writer's DuckDB instance, and an instance kept alive by it between rounds
        # would keep a reopened writer from attaching the store (AuditWriter.cursor)
        self._local = self._open_local()
        try:
            return self._ship_round()
        finally:
            local, self._local = self._local, None
            with contextlib.suppress(Exception):
                local.close()

    def _ship_round(self) -> int:
        top = self._local.execute("SELECT max(seq) FROM flows").fetchone()[0]
        if top is not None and top == self._shipped_to:
            # a hint only (the lake's head decides what is shipped): nothing new locally,
            # so the catalog is not even attached this round
            self.last_ok = time.time()
            return 0
        n = 0
        try:
            if self._lake is None:
                self._lake = connect(self.cfg)
                self._attached = True
            elif not self._attached:
                attach(self._lake, self.cfg)
                self._attached = True
            while True:
                got = ship_segment(self._local, self._lake, self.replica,
                                   self.cfg.segment_rows)
                if not got:
                    break
                n += got
                self.shipped += got
                self.segments += 1
            head = lake_head(self._lake, self.replica)
            self._shipped_to = head[0] if head else None
        finally:
            if self._attached and not self.cfg.on_postgres:
                # A DuckDB catalog file is locked by the process that has it attached: let
                # go between rounds so the other processes of this host (and the audit CLI)
                # get their turn. The extension stays loaded. A Postgres catalog takes
                # every replica at once and stays attached.
                with contextlib.suppress(Exception):
                    self._lake.execute(f"DETACH DATABASE {LAKE}")
                self._attached = False
        self.last_ok = time.time()
        self.last_error = None
        return n

    def _reset(self) -> None:
        for con in (self._lake, self._local):
            if con is not None:
                with contextlib.suppress(Exception):
                    con.close()
        self._lake = self._local = None
        self._shipped_to = None
        self._attached = False

    def _run(self) -> None:
        backoff = 1.0
        wait = self.cfg.interval_s
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.ship_all()
                backoff, wait = 1.0, self.cfg.interval_s
            except Exception as e:  # noqa: BLE001 - retried; the local store keeps the rows
                self._failed(e)
                wait = backoff
                backoff = min(backoff * 2, 60.0)

    def _failed(self, e: BaseException) -> None:
        msg = redact_catalog(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             self.cfg.catalog)[:500]
        if msg != self.last_error:
            log.error("agentgate: shipping to the audit lake failed (will retry): %s", msg)
        self.last_error = msg
        self._reset()

    def poke(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30) -> bool:
        """Stop the thread and ship what is left (the caller flushed the local writer)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        ok = True
        try:
            self.ship_all()
        except Exception as e:  # noqa: BLE001 - reported; the next start ships it
            self._failed(e)
            ok = False
        self._reset()
        return ok


# ---------------------------------------------------------------- verification
@dataclass
class ReplicaResult:
    replica: str
    ok: bool = True
    count: int = 0
    segments: int = 0
    head_seq: int = 0
    head_hash: str = ""
    problem: str | None = None


@dataclass
class LakeVerifyResult:
    ok: bool
    replicas: list[ReplicaResult] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"replica {r.replica}: {r.problem}" for r in self.replicas if r.problem]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems,
                "replicas": [dict(r.__dict__) for r in self.replicas]}


def _lake_columns(lake: Any) -> set[str]:
    return {r[0] for r in lake.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = ? "
        "AND table_name = 'flows'", [LAKE]).fetchall()}


def _select_verify(have: set[str]) -> str:
    """The verify query; a reference column an older lake (read-only) lacks reads NULL,
    which is how a record without that reference hashes."""
    cols = ", ".join(f"epoch_us({c}) AS {c}" if c in TIMESTAMPS
                     else (c if c in have or c not in REFS else f"NULL AS {c}") for c in NAMES)
    return (f"SELECT {cols} FROM {LAKE}.flows "  # noqa: S608
            "WHERE replica = ? AND seq BETWEEN ? AND ? ORDER BY seq")


def _verify_replica(lake: Any, replica: str, chain: tuple | None, chunk: int) -> ReplicaResult:
    res = ReplicaResult(replica)

    def bad(problem: str) -> ReplicaResult:
        res.ok, res.problem = False, problem
        return res

    if chain is None:
        return bad("records or segments without a chain head in lake.chains (head removed)")
    first_seq, first_prev, last_seq, last_hash = chain
    segs = lake.execute(f"SELECT first_seq, last_seq, first_prev_hash, last_hash, rows FROM "  # noqa: S608
                        f"{LAKE}.segments WHERE replica = ? ORDER BY first_seq, last_seq",
                        [replica]).fetchall()
    exp_seq, exp_prev = int(first_seq), first_prev
    for s_first, s_last, s_prev, s_hash, s_rows in segs:
        if s_first != exp_seq or s_prev != exp_prev:
            if s_first > exp_seq:
                return bad(f"missing segment: records seq {exp_seq}..{s_first - 1} are not "
                           "in the lake")
            return bad(f"segment seq {s_first}..{s_last} does not continue the chain at seq "
                       f"{exp_seq} (edited or duplicated segment)")
        cur = lake.execute(_select_verify(_lake_columns(lake)), [replica, s_first, s_last])
        n = 0
        while True:
            batch = cur.fetchmany(chunk)
            if not batch:
                break
            for values in batch:
                row = dict(zip(NAMES, values, strict=True))
                if isinstance(row.get("identity_groups"), tuple):
                    row["identity_groups"] = list(row["identity_groups"])
                if row["seq"] != exp_seq:
                    return bad(f"segment seq {s_first}..{s_last}: record seq {exp_seq} is "
                               f"missing (next is seq {row['seq']})")
                if row["prev_hash"] != exp_prev:
                    return bad(f"record seq {row['seq']} (id {row['id']}) is not chained to "
                               f"seq {exp_seq - 1}")
                if store.chain_hash(row["prev_hash"] or "", row) != row["hash"]:
                    return bad(f"edited: record seq {row['seq']} (id {row['id']}) does not "
                               "match its hash")
                n += 1
                res.count += 1
                exp_seq, exp_prev = row["seq"] + 1, row["hash"]
        if n != s_rows or exp_prev != s_hash or exp_seq != s_last + 1:
            return bad(f"segment seq {s_first}..{s_last}: its records do not end at its seal "
                       f"({n} of {s_rows} records)")
        res.segments += 1
        res.head_seq, res.head_hash = s_last, s_hash
    if exp_seq - 1 != last_seq or exp_prev != last_hash:
        return bad(f"missing segment: the lake's head for this replica is seq {last_seq} but "
                   f"its segments end at seq {exp_seq - 1}")
    extra = lake.execute(f"SELECT count(*) FROM {LAKE}.flows WHERE replica = ?",  # noqa: S608
                         [replica]).fetchone()[0]
    if extra != res.count:
        return bad(f"{extra - res.count} records outside sealed segments")
    return res


def _blobs_problem(lake: Any, chunk: int = 2000) -> str | None:
    """Every shipped blob matches its content address and every reference is shipped."""
    leaf, node = store.leaf_address, store.node_address
    cur = lake.execute(f"SELECT hash, data, prev, part FROM {LAKE}.blobs")  # noqa: S608
    while batch := cur.fetchmany(chunk):
        for h, data, prev, part in batch:
            ok = (prev is None and part is None and leaf(bytes(data)) == h) if data is not None \
                else (part is not None and node(prev, part) == h)
            if not ok:
                return f"edited: blob {h} does not match its address"
    refs = " UNION ALL ".join(
        f"SELECT replica, seq, {c} AS ref FROM {LAKE}.flows"  # noqa: S608
        for c in REFS if c in _lake_columns(lake))
    r = lake.execute(f"SELECT replica, seq, ref FROM ({refs}) WHERE ref IS NOT NULL AND ref "  # noqa: S608
                     f"NOT IN (SELECT hash FROM {LAKE}.blobs) LIMIT 1").fetchone()
    if r:
        return f"missing: blob {r[2]} (a body of replica {r[0]} record seq {r[1]})"
    r = lake.execute(f"SELECT x.ref FROM (SELECT prev AS ref FROM {LAKE}.blobs UNION ALL "  # noqa: S608
                     f"SELECT part FROM {LAKE}.blobs) x WHERE x.ref IS NOT NULL AND x.ref NOT "
                     f"IN (SELECT hash FROM {LAKE}.blobs) LIMIT 1").fetchone()
    if r:
        return f"missing: blob {r[0]} (a part of another blob)"
    return None


def verify(lake: Any, chunk: int = 2000) -> LakeVerifyResult:
    """Walk every replica's chain across its segments; never raises for a bad lake."""
    try:
        chains = {r[0]: tuple(r[1:]) for r in lake.execute(
            f"SELECT replica, first_seq, first_prev_hash, last_seq, last_hash "  # noqa: S608
            f"FROM {LAKE}.chains").fetchall()}
        names = set(chains)
        for t in ("segments", "flows"):
            names |= {r[0] for r in lake.execute(
                f"SELECT DISTINCT replica FROM {LAKE}.{t}").fetchall()}  # noqa: S608
    except Exception as e:  # noqa: BLE001 - a missing table / unreadable file is a finding
        return LakeVerifyResult(False, [ReplicaResult("*", False, problem=(
            f"cannot read the lake: {type(e).__name__}: {str(e).splitlines()[0][:300]}"))])
    out = []
    for name in sorted(names):
        try:
            out.append(_verify_replica(lake, name, chains.get(name), chunk))
        except Exception as e:  # noqa: BLE001 - e.g. a Parquet file removed or damaged
            out.append(ReplicaResult(name, False, problem=(
                f"unreadable segment data: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}")))
    try:
        blob_problem = _blobs_problem(lake, chunk)
    except Exception as e:  # noqa: BLE001 - unreadable blob data is a finding too
        blob_problem = f"unreadable blob data: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if blob_problem:
        out.append(ReplicaResult("*", False, problem=blob_problem))
    return LakeVerifyResult(all(r.ok for r in out), out)


def open_for_queries(cfg: LakeConfig) -> Any:
    """A read-only lake connection whose default catalog is the lake: `flows` is every
    replica's records (column `replica` says whose), as the audit CLI's SQL expects."""
    con = connect(cfg, read_only=True)
    # The SQL is the user's: the lake's own data directory stays readable, nothing else of
    # the file system (read_text('/etc/…'), COPY … TO) — as with the local store.
    data = con.execute(f"SELECT value FROM __ducklake_metadata_{LAKE}.ducklake_metadata "  # noqa: S608
                       "WHERE key = 'data_path'").fetchone()
    if data and data[0]:
        con.execute(f"SET allowed_directories = [{_lit(str(data[0]))}]")
    con.execute(f"USE {LAKE}")
    con.execute("SET enable_external_access = false")
    return con


def env_replica() -> str | None:
    return os.environ.get("AGENTGATE_REPLICA") or None


def open_local(path: str | Path) -> Any:
    """A reading connection to a replica's local store that no writer of this process
    has open (the writer process gives its shipper AuditWriter.cursor instead: one file
    is attached by one DuckDB instance of a process). Unlike writer.open_db it writes
    nothing (no schema step)."""
    import duckdb

    from addons.recording.writer import DB_CONFIG
    return duckdb.connect(str(path), config=dict(DB_CONFIG))


class LakeShipping:
    """Addon: ships this replica's audit store to the lake of the rules' `audit_lake:`.

    The shipper runs in the recorder's writer process (addons/recording/writerproc.py), which
    owns the local store's DuckDB instance: this addon hands it the lake and the replica name
    (`Recorder.ship_to_lake`). The writer process ships the rest after its last write when
    the gateway stops. Without `audit_lake:` it does nothing. The lake is read at start; a
    changed `audit_lake:` takes effect at the next start (logged)."""

    def __init__(self, holder: Any, recorder: Any) -> None:
        self.holder = holder
        self.recorder = recorder
        self.cfg: LakeConfig | None = None

    def running(self) -> None:
        rules = self.holder.rules
        cfg = getattr(rules, "audit_lake", None) if rules is not None else None
        if not isinstance(cfg, LakeConfig):
            return
        if not self.recorder.cfg.enabled:
            log.warning("agentgate: audit_lake is set but recording is off: nothing to ship")
            return
        path = self.recorder.db_path()
        replica = cfg.replica or env_replica() or default_replica(path)
        self.cfg = cfg
        self.recorder.ship_to_lake(cfg, replica)
        self.holder.on_change(self._rules_changed)
        log.info("agentgate: %s, replica %s", cfg.describe(), replica)

    def _rules_changed(self, rules: Any) -> None:
        if self.cfg is not None and getattr(rules, "audit_lake", None) != self.cfg:
            log.warning("agentgate: audit_lake changed; restart the gateway to ship to the new "
                        "lake (still shipping to the one it started with)")

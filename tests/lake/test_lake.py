"""The audit lake (addons/recording/lake.py) on a real DuckLake: a local DuckDB catalog and,
with Debian's postgresql, a Postgres catalog; Parquet data in a temp directory.

Two replicas' local stores are written with the recorder's own functions (store.append, as
the writer thread does), shipped in segments, and read back with `agentgate audit … --lake`
(a real subprocess). Tampering is done on the lake itself, as an attacker with write access
to the catalog would: a removed middle segment, a removed last segment, an edited record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from addons.recording import lake, store, writer
from tests.recording.test_store import pending

ROOT = Path(__file__).resolve().parents[2]
# six messages: enough blob rows per shipped segment that the lake writes Parquet files
# (a few rows DuckLake may keep inlined in its catalog, and the Parquet tests need files)
BIG = json.dumps({"model": "gpt-4o-mini", "messages": [
    {"role": "user", "content": "x" * 3000 + str(i)} for i in range(6)]}).encode()


def fill(path: Path, n: int, session: str, start: int = 0, big_every: int = 0) -> None:
    con = writer.open_db(path)
    try:
        rows = [store.build_row(pending(i, session=session,
                                        **({"body": BIG} if big_every and i % big_every == 0
                                           else {})))
                for i in range(start, start + n)]
        store.append(con, rows, store.head(con))
    finally:
        con.close()


def shipper(cfg: lake.LakeConfig, replica: str, path: Path) -> lake.LakeShipper:
    return lake.LakeShipper(cfg, replica, lambda: lake.open_local(path))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", "audit", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AGENTGATE_RULES": "/nonexistent"})


@pytest.fixture
def two(tmp_path: Path) -> tuple[lake.LakeConfig, list[lake.LakeShipper]]:
    cfg = lake.LakeConfig(catalog=str(tmp_path / "audit.ducklake"),
                          data=str(tmp_path / "parquet"), segment_rows=4)
    ships = []
    for name, session in (("gw-a", "s-shared"), ("gw-b", "s-shared")):
        db = tmp_path / f"{name}.duckdb"
        fill(db, 10, session, big_every=3)
        ships.append(shipper(cfg, name, db))
    return cfg, ships


def lake_con(cfg: lake.LakeConfig):
    return lake.connect(cfg)


def test_two_replicas_ship_in_segments_and_verify(two, tmp_path: Path) -> None:
    cfg, (a, b) = two
    assert a.ship_all() == 10 and b.ship_all() == 10
    assert a.segments == 3  # 4 + 4 + 2
    assert a.ship_all() == 0  # nothing new: nothing shipped twice
    fill(tmp_path / "gw-a.duckdb", 3, "s-late", start=10)
    assert a.ship_all() == 3
    con = lake_con(cfg)
    r = lake.verify(con)
    assert r.ok, r.problems
    reps = {x.replica: x for x in r.replicas}
    assert reps["gw-a"].count == 13 and reps["gw-a"].segments == 4
    assert reps["gw-b"].count == 10
    # bodies over the recorder's inline size went by reference: their blobs are in the lake
    assert con.execute("SELECT count(*) FROM lake.flows WHERE request_body_ref IS NOT NULL"
                       ).fetchone()[0] == 8  # seq 1, 4, 7, 10 of each replica
    assert con.execute("SELECT count(*) FROM lake.blobs").fetchone()[0] > 0
    con.close()
    a.stop(1), b.stop(1)

    out = cli("verify", "--lake", cfg.catalog)
    assert out.returncode == 0, out.stderr
    assert "replica gw-a: 13 records in 4 segments" in out.stdout
    assert "replica gw-b: 10 records in 3 segments" in out.stdout
    q = cli("query", "--lake", cfg.catalog, "--format", "json",
            "SELECT replica, count(*) AS n FROM flows GROUP BY 1 ORDER BY 1")
    assert q.returncode == 0, q.stderr
    assert [json.loads(x) for x in q.stdout.splitlines()] == [
        {"replica": "gw-a", "n": 13}, {"replica": "gw-b", "n": 10}]
    s = cli("sessions", "--lake", cfg.catalog, "--format", "json")
    assert s.returncode == 0, s.stderr
    by = {x["session_id"]: x for x in map(json.loads, s.stdout.splitlines())}
    assert by["s-shared"]["flows"] == 20 and by["s-late"]["flows"] == 3
    # the lake is read-only for the CLI
    w = cli("query", "--lake", cfg.catalog, "DELETE FROM flows")
    assert w.returncode != 0 and "read-only" in w.stderr


def test_missing_middle_segment_is_reported(two) -> None:
    cfg, (a, b) = two
    a.ship_all(), b.ship_all()
    a.stop(1), b.stop(1)
    con = lake_con(cfg)
    con.execute("DELETE FROM lake.flows WHERE replica = 'gw-a' AND seq BETWEEN 5 AND 8")
    con.execute("DELETE FROM lake.segments WHERE replica = 'gw-a' AND first_seq = 5")
    r = lake.verify(con)
    con.close()
    assert not r.ok
    assert r.problems == ["replica gw-a: missing segment: records seq 5..8 are not in the lake"]
    assert [x.ok for x in r.replicas if x.replica == "gw-b"] == [True]
    out = cli("verify", "--lake", cfg.catalog)
    assert out.returncode == 1 and "missing segment" in out.stderr
    assert "OK: replica gw-b" in out.stdout


def test_missing_last_segment_is_reported(two) -> None:
    cfg, (a, b) = two
    a.ship_all(), b.ship_all()
    a.stop(1), b.stop(1)
    con = lake_con(cfg)
    con.execute("DELETE FROM lake.flows WHERE replica = 'gw-b' AND seq >= 9")
    con.execute("DELETE FROM lake.segments WHERE replica = 'gw-b' AND first_seq = 9")
    r = lake.verify(con)
    con.close()
    assert not r.ok and len(r.problems) == 1
    assert "gw-b: missing segment: the lake's head for this replica is seq 10" in r.problems[0]


def test_edited_record_and_records_outside_segments_are_reported(two) -> None:
    cfg, (a, b) = two
    a.ship_all(), b.ship_all()
    a.stop(1), b.stop(1)
    con = lake_con(cfg)
    con.execute("UPDATE lake.flows SET model = 'gpt-5' WHERE replica = 'gw-a' AND seq = 6")
    con.execute("INSERT INTO lake.flows (replica, seq, id) VALUES ('gw-b', 11, 'forged')")
    r = lake.verify(con)
    con.close()
    assert not r.ok
    assert any(p.startswith("replica gw-a: edited: record seq 6") for p in r.problems), r.problems
    assert "replica gw-b: 1 records outside sealed segments" in r.problems


def test_edited_segment_seal_is_reported(two) -> None:
    cfg, (a, _b) = two
    a.ship_all()
    a.stop(1)
    con = lake_con(cfg)
    con.execute("UPDATE lake.segments SET last_hash = 'f' || last_hash "
                "WHERE replica = 'gw-a' AND first_seq = 1")
    r = lake.verify(con)
    con.close()
    assert not r.ok and "its records do not end at its seal" in r.problems[0]


def test_concurrent_shippers_of_one_replica_ship_each_record_once(two) -> None:
    """Idempotent: the lake's head, re-read in the shipping transaction, decides; a second
    shipper (a restarted replica racing its predecessor) never seals a range twice."""
    cfg, (a, _b) = two
    twin = shipper(cfg, "gw-a", Path(cfg.catalog).parent / "gw-a.duckdb")
    errors: list[BaseException] = []

    def run(s: lake.LakeShipper) -> None:
        for _ in range(5):
            try:
                s.ship_all()
            except Exception as e:  # noqa: BLE001 - a DuckLake write conflict: retried
                errors.append(e)
                s._reset()

    ts = [threading.Thread(target=run, args=(s,)) for s in (a, twin)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    a.ship_all()
    con = lake_con(cfg)
    n = con.execute("SELECT count(*), count(DISTINCT seq) FROM lake.flows "
                    "WHERE replica = 'gw-a'").fetchone()
    r = lake.verify(con)
    con.close()
    a.stop(1), twin.stop(1)
    assert n == (10, 10)
    assert r.ok, r.problems


def test_replaced_local_store_is_not_shipped_under_the_same_name(two, tmp_path: Path) -> None:
    cfg, (a, _b) = two
    a.ship_all()
    a.stop(1)
    fresh = tmp_path / "fresh.duckdb"
    fill(fresh, 12, "other")
    s = shipper(cfg, "gw-a", fresh)
    with pytest.raises(lake.LakeError, match="does not continue the lake's chain"):
        s.ship_all()
    s._reset()
    con = lake_con(cfg)
    assert lake.verify(con).ok
    con.close()


def test_removed_parquet_file_is_reported(two, tmp_path: Path) -> None:
    cfg, (a, _b) = two
    a.ship_all()
    a.stop(1)
    files = sorted((tmp_path / "parquet").rglob("*.parquet"))
    assert files
    for f in files:
        f.unlink()
    out = cli("verify", "--lake", cfg.catalog)
    assert out.returncode == 1
    assert "TAMPERED" in out.stderr


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    from addons.config.loader import load_rules
    from addons.config.schema import ConfigError
    d = tmp_path / "rules"
    d.mkdir()
    (d / "lake.yaml").write_text("audit_lake:\n  catalog: postgresql://u:pw@h/db\n")
    with pytest.raises(ConfigError, match=r"audit_lake\.data.*required with a Postgres"):
        load_rules(d)
    (d / "lake.yaml").write_text("audit_lake:\n  catalog: x.ducklake\n  segment_rows: 0\n")
    with pytest.raises(ConfigError, match=r"audit_lake\.segment_rows"):
        load_rules(d)
    (d / "lake.yaml").write_text("audit_lake:\n  catalog: /l/x.ducklake\n  replica: gw-1\n")
    cfg = load_rules(d).audit_lake
    assert cfg == lake.LakeConfig(catalog="/l/x.ducklake", replica="gw-1")
    assert cfg.data_path() == "/l/x.ducklake.files"


def test_records_purged_before_shipping_show_as_a_gap(two, tmp_path: Path) -> None:
    """The lake was unreachable longer than local retention: the purged records are lost to
    the lake, the shipper goes on with the rest, and verify names the missing range."""
    cfg, (a, _b) = two
    a.ship_all()  # seq 1..10
    a.stop(1)
    db = tmp_path / "gw-a.duckdb"
    fill(db, 6, "s-later", start=10)  # seq 11..16
    con = writer.open_db(db)
    con.execute("INSERT INTO chain_checkpoints SELECT seq, hash, 13, now(), now() "
                "FROM flows WHERE seq = 13")
    con.execute("DELETE FROM flows WHERE seq <= 13")  # as retention does
    con.close()
    s = shipper(cfg, "gw-a", db)
    assert s.ship_all() == 3  # seq 14..16
    s.stop(1)
    lk = lake_con(cfg)
    r = lake.verify(lk)
    lk.close()
    assert r.problems == ["replica gw-a: missing segment: records seq 11..13 are not in the lake"]


def test_lake_queries_read_no_other_file(two) -> None:
    cfg, (a, _b) = two
    a.ship_all()
    a.stop(1)
    q = cli("query", "--lake", cfg.catalog, "SELECT * FROM read_text('/etc/hostname')")
    assert q.returncode != 0 and "disabled" in q.stderr
    ok = cli("query", "--lake", cfg.catalog, "SELECT count(*) AS n FROM flows")
    assert ok.returncode == 0 and "10" in ok.stdout


def test_edited_or_missing_blob_is_reported(two) -> None:
    cfg, (a, _b) = two
    a.ship_all()
    a.stop(1)
    con = lake_con(cfg)
    h = con.execute("SELECT hash FROM lake.blobs WHERE data IS NOT NULL LIMIT 1").fetchone()[0]
    con.execute("UPDATE lake.blobs SET data = 'forged'::BLOB WHERE hash = ?", [h])
    r = lake.verify(con)
    assert not r.ok and r.problems == [f"replica *: edited: blob {h} does not match its address"]
    con.execute("DELETE FROM lake.blobs WHERE hash = ?", [h])
    r = lake.verify(con)
    con.close()
    assert not r.ok and "missing: blob" in r.problems[0]


def test_a_lake_made_before_certs_ref_verifies_and_gets_the_column(two) -> None:
    cfg, (a, _b) = two
    con = lake_con(cfg)  # creates the lake, then make it look like one from before schema 3
    con.execute("ALTER TABLE lake.flows DROP COLUMN certs_ref")
    con.close()
    ro = lake.connect(cfg, read_only=True)  # read-only: verified as it is
    assert lake.verify(ro).ok
    ro.close()
    assert a.ship_all() == 10  # attached for writing: the column is added, records shipped
    con = lake_con(cfg)
    assert "certs_ref" in lake._lake_columns(con)
    r = lake.verify(con)
    assert r.ok, r.problems
    con.close()
    a.stop(1)

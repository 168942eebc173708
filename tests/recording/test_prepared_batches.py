"""The writer's batch INSERTs are bound once per connection (store.BatchStatements, PERF-AV).

DuckDB binds a statement on every execute() from Python; binding the JSON INSERTs cost
~3.5 ms (flows) and ~2 ms (blobs) of the writer's CPU per batch. With BatchStatements the
INSERT text is PREPAREd once and each batch runs EXECUTE on documents staged in a temporary
table. What must hold: the statement is bound once, not per batch; the rows and blobs stored
are the very rows the unprepared INSERTs store (same text read by the same SQL); a batch
that fails or is rolled back leaves nothing staged for the next; a reopened connection gets
its statements prepared anew.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from addons.recording import store, writer
from addons.recording.writerproc import build
from tests.recording.test_write_path import _pendings


class _Recording:
    """A connection that records the SQL it is given (and otherwise is the connection)."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.sql: list[str] = []

    def execute(self, sql: str, *args: Any) -> Any:
        self.sql.append(sql)
        return self.con.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        self.sql.append(sql)
        return self.con.executemany(sql, *args)


def _batches() -> list[list[dict[str, Any]]]:
    rows = [build(p) for p in _pendings(5)]
    return [rows[k:k + 6] for k in range(0, len(rows), 6)]


def _store(path: Path, batches: list[list[dict[str, Any]]], prepared: bool
           ) -> tuple[list[tuple], list[tuple], list[str]]:
    raw = writer.open_db(path)
    con = _Recording(raw)
    stmts = store.BatchStatements(con) if prepared else None
    known = store.BlobCache()
    try:
        head = store.head(raw)
        for k, batch in enumerate(batches):
            head = store.append(con, [dict(r) for r in batch], head, known,
                                marks=[("writer-run:t", str(k))],
                                **({"stmts": stmts} if prepared else {}))
        assert store.verify(raw).ok
        return (raw.execute("SELECT * FROM flows ORDER BY seq").fetchall(),
                raw.execute("SELECT * FROM blobs ORDER BY hash").fetchall(), con.sql)
    finally:
        raw.close()


def test_the_inserts_are_bound_once_and_store_the_same_rows(tmp_path: Path) -> None:
    batches = _batches()
    assert len(batches) >= 4
    rows, blobs, sql = _store(tmp_path / "prepared.duckdb", batches, True)
    ref_rows, ref_blobs, ref_sql = _store(tmp_path / "plain.duckdb", batches, False)
    assert rows == ref_rows and blobs == ref_blobs
    assert len(rows) == sum(map(len, batches)) and blobs
    binds = [s for s in sql if "from_json(" in s]
    # every batch had blobs and rows: the plain path binds both INSERTs per batch
    assert len([s for s in ref_sql if "from_json(" in s]) >= 2 * len(batches)
    # prepared: one PREPARE per distinct statement (column set, blob INSERT), nothing else
    assert binds and all(s.startswith("PREPARE ") for s in binds)
    assert len(binds) == len({s.split(" AS ", 1)[1] for s in binds}) < len(batches)
    assert sum(s.startswith("EXECUTE ") for s in sql) >= 2 * len(batches)


def test_a_failed_batch_leaves_nothing_staged(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch rolled back after its documents were staged: the next batch stores its own
    rows only (a staged document left behind would be inserted again with it)."""
    batches = _batches()
    con = writer.open_db(tmp_path / "a.duckdb")
    stmts = store.BatchStatements(con)
    try:
        head = store.append(con, [dict(r) for r in batches[0]], store.head(con), stmts=stmts)
        real = store._set_meta  # noqa: SLF001 - runs after the INSERTs, in the transaction

        def fail(*a: Any, **kw: Any) -> None:
            raise duckdb.IOException("injected after the inserts")

        monkeypatch.setattr(store, "_set_meta", fail)
        with pytest.raises(duckdb.IOException):
            store.append(con, [dict(r) for r in batches[1]], head, stmts=stmts)
        monkeypatch.setattr(store, "_set_meta", real)
        assert con.execute(f"SELECT count(*) FROM temp.{store.STAGE}").fetchone() == (0,)
        head = store.append(con, [dict(r) for r in batches[1]], head, stmts=stmts)
        n = len(batches[0]) + len(batches[1])
        assert con.execute("SELECT count(*), max(seq) FROM flows").fetchone() == (n, n)
        # (verify reads with the readers' limit, as the writer process gives it)
        con.execute(f"SET memory_limit = '{writer.READ_MEMORY_LIMIT_MB}MB'")
        assert head[0] == n and store.verify(con).ok
    finally:
        con.close()


def test_a_stale_staged_document_fails_the_batch(tmp_path: Path) -> None:
    """Whatever left a document staged, the batch is refused (rolled back), not stored with
    another batch's rows: the flows INSERT must store exactly the batch's rows."""
    batches = _batches()
    con = writer.open_db(tmp_path / "a.duckdb")
    stmts = store.BatchStatements(con)
    try:
        head = store.append(con, [dict(r) for r in batches[0]], store.head(con), stmts=stmts)
        stale, _ = store.rows_doc([dict(r, seq=99, hash="x") for r in batches[0]])
        con.execute(f"INSERT INTO temp.{store.STAGE} VALUES (?, NULL)", [stale])
        with pytest.raises(RuntimeError, match="batch INSERT stored"):
            store.append(con, [dict(r) for r in batches[1]], head, stmts=stmts)
        assert con.execute("SELECT count(*) FROM flows").fetchone() == (len(batches[0]),)
        assert store.verify(con).ok
    finally:
        con.close()


def test_the_writer_prepares_again_on_a_reopened_connection(tmp_path: Path) -> None:
    from tests.recording.test_writer import make_writer, pending

    w = make_writer(tmp_path)
    try:
        w.submit(pending(0))
        assert w.flush(30)
        first = w._stmts  # noqa: SLF001
        assert first is not None and first.con is w._con and first.prepared  # noqa: SLF001
        assert w._con is not None  # noqa: SLF001
        w._con.close()  # noqa: SLF001 - what an invalidated database looks like
        for i in range(1, 4):
            w.submit(pending(i))
        assert w.flush(30), w.failure
        assert w._stmts is not first and w._stmts.con is w._con  # noqa: SLF001
        got = w._con.execute("SELECT id FROM flows ORDER BY seq").fetchall()  # noqa: SLF001
        assert [r[0] for r in got] == [f"flow-{i}" for i in range(4)]
    finally:
        w.close()


def test_a_large_batch_binds_its_inserts_as_before(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Past STAGE_MAX characters of JSON, copying the documents into the stage costs more
    than binding saves: such a batch runs the INSERTs directly, and stores the same."""
    batches = _batches()
    monkeypatch.setattr(store.BatchStatements, "STAGE_MAX", 1)
    rows, blobs, sql = _store(tmp_path / "large.duckdb", batches, True)
    ref_rows, ref_blobs, _ = _store(tmp_path / "plain.duckdb", batches, False)
    assert rows == ref_rows and blobs == ref_blobs
    assert not any(s.startswith(("PREPARE ", "EXECUTE ")) for s in sql)
    assert len([s for s in sql if "from_json(?" in s]) >= 2 * len(batches)

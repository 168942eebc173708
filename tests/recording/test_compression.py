"""How the audit store's bytes are laid out on disk: a store created by the writer uses
DuckDB's storage format with ZSTD for strings on the columns that repeat their text from
row to row (store.ZSTD_COLUMNS), what is read back is unchanged, and a file made in the
older format keeps working without a column falling back to uncompressed."""

from __future__ import annotations

import uuid
from pathlib import Path

import duckdb

from addons.recording import store, writer
from tests.recording.test_store import pending

ROWS = 1500


def write_rows(con: duckdb.DuckDBPyConnection, n: int = ROWS) -> list[dict]:
    rows = []
    for i in range(n):
        p = pending(i, meta={"identity": {"sub": f"agent-{i % 7}", "iss": "https://idp"},
                             "decision": {"action": "allow", "rule": "models"},
                             "session": f"s{i % 20}"},
                    session=f"s{i % 20}")
        # what makes real flow states differ from row to row: ids and times
        p.state["id"] = str(uuid.uuid4())
        p.state["client_conn"]["id"] = str(uuid.uuid4())
        p.state["timestamp_created"] += i * 0.0137
        rows.append(store.build_row(p))
    head = store.head(con)
    for k in range(0, n, 200):
        head = store.append(con, rows[k:k + 200], head)
    con.execute("CHECKPOINT")
    return rows


def compression(con: duckdb.DuckDBPyConnection, table: str, column: str) -> set[str]:
    return {r[0] for r in con.execute(
        f"SELECT DISTINCT compression FROM pragma_storage_info('{table}') "  # noqa: S608
        "WHERE column_name = ? AND segment_type NOT IN ('VALIDITY')", [column]).fetchall()}


def used_bytes(con: duckdb.DuckDBPyConnection) -> int:
    size, used = con.execute("SELECT block_size, used_blocks FROM pragma_database_size() "
                             "WHERE database_name = current_database()").fetchone()
    return int(size) * int(used)


def test_a_new_store_keeps_flow_states_with_zstd_and_reads_them_back(tmp_path: Path) -> None:
    con = writer.open_db(tmp_path / "new.duckdb")
    assert store.storage_version(con) >= store.ZSTD_STORAGE
    rows = write_rows(con)
    for col in ("flow_state", "metadata", "request_headers"):
        assert compression(con, "flows", col) == {"ZSTD"}, col
    assert store.verify(con).ok
    back = {fid: state for fid, _url, state in store.export_rows(con, None)}
    assert len(back) == ROWS
    for row in rows[:50]:
        assert store.load_state(back[row["id"]]) == store.row_state(row)
    con.close()

    # the same rows in a file of the older format (what every store was until now)
    old = duckdb.connect(str(tmp_path / "old.duckdb"))
    store.init_schema(old)
    write_rows(old)
    con = writer.open_db(tmp_path / "new.duckdb", read_only=True)
    # fewer whole blocks for the same rows (1,500 small states: 5 blocks of 256 KiB, not 7;
    # the multi-turn bench's 800 real rows: 13, not 15-16)
    assert used_bytes(con) < used_bytes(old), (used_bytes(con), used_bytes(old))
    con.close()
    old.close()


def test_a_store_in_the_older_format_keeps_its_columns_compressed(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    duckdb.connect(str(path)).close()  # created before stores asked for the newer format
    con = writer.open_db(path)
    assert store.storage_version(con) < store.ZSTD_STORAGE
    write_rows(con, 300)
    # ZSTD asked of a format without it is stored uncompressed (twice the size). Checked
    # on the columns whose values repeat almost whole from row to row, which DuckDB's own
    # choice always compresses (for these small flow states it picks FSST or nothing,
    # either way from run to run)
    for col in ("metadata", "request_headers", "response_headers"):
        assert "Uncompressed" not in compression(con, "flows", col), col
    assert store.verify(con).ok
    con.close()

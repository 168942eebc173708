"""`agentgate audit query` answers bad SQL with a clear error, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.cli import main
from addons.recording import writer


@pytest.mark.parametrize("sql", ["SELECT no_such_column FROM flows", "SELEC 1",
                                 "SELECT * FROM no_such_table"])
def test_bad_sql_is_a_clear_error(tmp_path: Path, sql: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "audit.duckdb"
    writer.open_db(db).close()
    rc = main(["audit", "query", "--db", str(db), sql])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("agentgate audit query: ")
    assert "Traceback" not in err and "File \"" not in err

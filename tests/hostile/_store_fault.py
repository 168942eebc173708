"""mitmdump script for tests: the audit store fails while a flag file exists.

`AGENTGATE_TEST_STORE_FAULT=<path>`: while that file exists every append to the store
fails the way a fatal DuckDB I/O error does — the error is raised and the database
connection is gone (DuckDB invalidates the database after a fatal write error; every later
statement on it fails). Removing the file is "the disk works again".
"""

from __future__ import annotations

import contextlib
import os

import duckdb

from addons.recording import store

FLAG = os.environ.get("AGENTGATE_TEST_STORE_FAULT", "")
_real_append = store.append


def _append(con, rows, last):
    if FLAG and os.path.exists(FLAG):
        with contextlib.suppress(Exception):
            con.close()
        raise duckdb.IOException("injected: the audit disk failed")
    return _real_append(con, rows, last)


store.append = _append
addons: list[object] = []

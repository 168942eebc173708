"""Fault injection for tests: the audit store fails while a flag file exists.

This directory goes first on PYTHONPATH of the gateway under test; the audit writer process
inherits it, and Python imports this `sitecustomize` at its start — so the fault is in the
process that really owns the store (the gateway itself never appends).

`AGENTGATE_TEST_STORE_FAULT=<path>`: while that file exists every append to the store
fails the way a fatal DuckDB I/O error does — the error is raised and the database
connection is gone (DuckDB invalidates the database after a fatal write error; every later
statement on it fails). Removing the file is "the disk works again".
"""

from __future__ import annotations

import contextlib
import os

FLAG = os.environ.get("AGENTGATE_TEST_STORE_FAULT", "")

if FLAG:
    import duckdb

    from addons.recording import store

    _real_append = store.append

    def _append(con, rows, last, *args, **kwargs):
        if os.path.exists(FLAG):
            with contextlib.suppress(Exception):
                con.close()
            raise duckdb.IOException("injected: the audit disk failed")
        return _real_append(con, rows, last, *args, **kwargs)

    store.append = _append

"""Fault injection for tests, in the process that really owns the audit store.

This directory goes first on PYTHONPATH of the gateway under test; the audit writer process
inherits it, and Python imports this `sitecustomize` at its start — so the fault is in the
writer process (the gateway itself never appends).

`AGENTGATE_TEST_STORE_FAULT=<path>`: while that file exists every append to the store
fails the way a fatal DuckDB I/O error does — the error is raised and the database
connection is gone (DuckDB invalidates the database after a fatal write error; every later
statement on it fails). Removing the file is "the disk works again".

`AGENTGATE_TEST_DIE_AFTER_COMMIT=<path>`: if that file exists, the next append commits and
then the process dies at once (the file is removed first) — before it can acknowledge what
it committed.
"""

from __future__ import annotations

import contextlib
import os

FLAG = os.environ.get("AGENTGATE_TEST_STORE_FAULT", "")
DIE = os.environ.get("AGENTGATE_TEST_DIE_AFTER_COMMIT", "")

if FLAG or DIE:
    import duckdb

    from addons.recording import store

    _real_append = store.append

    def _append(con, rows, last, *args, **kwargs):
        if FLAG and os.path.exists(FLAG):
            with contextlib.suppress(Exception):
                con.close()
            raise duckdb.IOException("injected: the audit disk failed")
        out = _real_append(con, rows, last, *args, **kwargs)
        if DIE and os.path.exists(DIE):
            os.unlink(DIE)
            os._exit(9)
        return out

    store.append = _append

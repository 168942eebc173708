"""The two hooks the relay calls per statement, implemented by helper PG-B (issue 14).

PG-B: implement these in `addons/database/rowmask.py` and `addons/database/records.py`;
the relay (addons/database/session.py) finds them here through `resolve_hooks()`:

- `addons.database.rowmask.make_result_masker(db, statement, formats, row_description)
  -> ResultMasker` — called when the server starts answering one execution (a simple
  Query, or an Execute of a portal). `db` is the `Database` (addons/database/config.py) with
  its `mask_columns` and `mask` settings, `statement` the `Statement` (addons/database/
  sqlfacts.py: kinds, tables, …) or None (a message that carries no SQL), `formats` the result
  format codes the client asked for in Bind (() for simple Query = all text; one code = all
  columns; else one per column), `row_description` the RowDescription payload (without type
  byte and length) already known for this portal/statement, or None (it will arrive through
  `row_description()`). Each method gets a message *payload* (no type byte, no length) and
  returns the payload to send instead; raising `MaskRefused` refuses the message: the relay
  then sends the client an ErrorResponse (SQLSTATE 42501) instead of the rest of the result
  and closes the connection (a half-sent result cannot be resumed).
- `addons.database.records.make_statement_recorder(recorder) -> Callable[[dict], None]` —
  `recorder` is the gateway's Recorder addon (addons/recording/addon.py); the returned
  callable is called once per statement, on the event loop, and must not block (queue the
  write). The dict: {"db": name, "upstream": "host:port", "database", "identity": {sub, iss,
  groups, …} (never the token), "session": the agent's session id or None, "peer": "ip:port",
  "sql": masked SQL (literals replaced by $n), "kinds": [..], "tables": [..], "functions":
  [..], "decision": allow|block|approve|observe|error, "rule": name or None, "approval":
  approval id/state or None, "rows": int or None, "command": CommandComplete tag or None,
  "error": str or None (SQLSTATE + message, masked), "started": epoch s, "ended": epoch s,
  "duration_ms": float}.

Until PG-B's modules exist the defaults below refuse: a connection is refused rather than
served unmasked or unrecorded (fail closed). Tests replace the factories on the Database
addon (its constructor takes them) with doubles.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("agentgate.database")


class MaskRefused(Exception):
    """A server message cannot be masked safely: the client must not get it."""


class HookMissing(Exception):
    """A hook the relay needs is not installed: refuse the connection."""


class ResultMasker(Protocol):
    def row_description(self, payload: bytes) -> bytes: ...

    def data_row(self, payload: bytes) -> bytes: ...

    def copy_data(self, payload: bytes) -> bytes: ...

    def notice(self, kind: bytes, payload: bytes) -> bytes:
        """ErrorResponse (b"E"), NoticeResponse (b"N") or NotificationResponse (b"A")."""
        ...


MaskerFactory = Callable[[Any, Any, tuple[int, ...], bytes | None], ResultMasker]
RecorderFactory = Callable[[Any], Callable[[dict[str, Any]], None]]


def resolve_hooks() -> tuple[MaskerFactory, RecorderFactory]:
    """PG-B's factories, or factories that raise HookMissing (the connection is refused)."""
    masker: MaskerFactory = _missing_masker
    recorder: RecorderFactory = _missing_recorder
    try:
        masker = importlib.import_module("addons.database.rowmask").make_result_masker
    except (ImportError, AttributeError) as e:
        log.error("agentgate: database result masking unavailable (%s): refusing connections",
                  type(e).__name__)
    try:
        recorder = importlib.import_module("addons.database.records").make_statement_recorder
    except (ImportError, AttributeError) as e:
        log.error("agentgate: database statement records unavailable (%s): refusing "
                  "connections", type(e).__name__)
    return masker, recorder


def _missing_masker(db: Any, statement: Any, formats: tuple[int, ...],
                    row_description: bytes | None) -> ResultMasker:
    raise HookMissing("result masking is not installed")


def _missing_recorder(recorder: Any) -> Callable[[dict[str, Any]], None]:
    raise HookMissing("statement recording is not installed")

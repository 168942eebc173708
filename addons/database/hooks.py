"""The two hooks the relay calls per statement, implemented by helper PG-B (issue 14).

PG-B: implement these in `addons/database/rowmask.py` and `addons/database/records.py`
(this follows rowmask.py's own design: one masker per client connection that sees every
message in both directions); the relay (addons/database/session.py) finds them through
`resolve_hooks()`:

- `addons.database.rowmask.make_result_masker(db, masking, identity, *, session, masker,
  sessions) -> ResultMasker`, once per client connection after login (`session`: the
  connection's session id; `masker`/`sessions`: the masking addon's, when the gateway has
  one, so results share the placeholders of the session's LLM traffic). `db` is the
  `Database` (addons/database/config.py: `mask`, `mask_columns`, …), `masking` the rules'
  masking section in force, `identity` the verified identity dict. The relay then calls, in
  wire order:
    `masker.client(msg_type, payload, token)` for every frontend message it forwards
      (payload without type byte and length; `token` is the relay's per-statement object for
      Query/Execute, else None);
    `masker.server(msg_type, payload) -> list[(msg_type, payload)]` for every backend
      message after login; the list is sent instead. Raising `Desync` (rowmask.py) or any
      other exception closes both connections.
    after each `server()` call the relay drains `masker.results` (a list it empties):
      objects with `.token`, `.tag` (CommandComplete tag or None), `.rows`, `.error`
      (str or None), `.findings` (count) — one per finished simple Query / Execute.
    before `server()` of a RowDescription, the relay resolves `wanted_tables(msg_type,
      payload)` (module function) that `masker.catalog.missing(oids)` reports, by running
      `CATALOG_SQL` (module constant, one `$1` int8[] parameter … or the OIDs inlined) over
      the gateway's own second login, and `masker.catalog.put(oids, rows)`.
- `addons.database.records.make_statement_recorder(recorder) -> Callable[[dict], None]` —
  `recorder` is the gateway's Recorder addon (addons/recording/addon.py); the returned
  callable is called once per statement, on the event loop, and must not block (queue the
  write). The dict: {"db": name, "upstream": "host:port", "database", "identity": {sub, iss,
  groups, …} (never the token), "session": the agent's session id or None, "peer": "ip:port",
  "sql": masked SQL (literals replaced by $n), "kinds": [..], "tables": [..], "functions":
  [..], "decision": allow|block|approve|observe, "rule": name or None, "approval": approval
  id/state or None, "rows": int or None, "command": CommandComplete tag or None, "error":
  str or None (SQLSTATE + message, masked), "findings": int, "started": epoch s, "ended":
  epoch s, "duration_ms": float, "findings_by_entity": {ENTITY: {count, strategy}} or None}.
  Its `unavailable()` attribute (None, or why the store cannot take a record now) is asked
  before each statement is forwarded: when it gives a reason the statement is refused (58000).

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


class HookMissing(Exception):
    """A hook the relay needs is not installed: refuse the connection."""


class ResultMasker(Protocol):
    results: list[Any]
    catalog: Any

    def client(self, msg_type: bytes, payload: bytes, token: Any) -> None: ...

    def server(self, msg_type: bytes, payload: bytes) -> list[tuple[bytes, bytes]]: ...


# (db, masking, identity, *, session=…, masker=…, sessions=…): see rowmask.make_result_masker
MaskerFactory = Callable[..., ResultMasker]
RecorderFactory = Callable[[Any], Callable[[dict[str, Any]], None]]


def resolve_hooks() -> tuple[MaskerFactory, RecorderFactory]:
    """PG-B's factories, or factories that raise HookMissing (the connection is refused)."""
    masker: MaskerFactory = _missing_masker
    recorder: RecorderFactory = _missing_recorder
    try:
        masker = importlib.import_module("addons.database.rowmask").make_result_masker
    except (ImportError, AttributeError) as e:
        log.warning("agentgate: database result masking unavailable (%s): refusing connections",
                  type(e).__name__)
    try:
        recorder = importlib.import_module("addons.database.records").make_statement_recorder
    except (ImportError, AttributeError) as e:
        log.warning("agentgate: database statement records unavailable (%s): refusing "
                  "connections", type(e).__name__)
    return masker, recorder


def _missing_masker(db: Any, masking: Any, identity: dict[str, Any], **_: Any) -> ResultMasker:
    raise HookMissing("result masking is not installed")


def _missing_recorder(recorder: Any) -> Callable[[dict[str, Any]], None]:
    raise HookMissing("statement recording is not installed")

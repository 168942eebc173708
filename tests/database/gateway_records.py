"""mitmdump script for the database tests: the gateway as addons/gateway.py builds it, with
the statement-record hook replaced by a double that appends each record (a JSON line) to
$AGENTGATE_TEST_PG_RECORDS, so tests can read what the relay reports per statement
("missing": the hook raises as a missing one does; while "<records>.down" exists the hook
says the store is unavailable and raises, as the real recorder does when its store is down)."""

from __future__ import annotations

import json
import os
from typing import Any

from addons import gateway
from addons.approval.addon import Approval
from addons.database.addon import Databases
from addons.database.hooks import HookMissing
from addons.recording.addon import Recorder


def _records(_recorder: Any):
    path = os.environ["AGENTGATE_TEST_PG_RECORDS"]
    if path == "missing":  # as when records.py is not installed: connections refused
        raise HookMissing("statement recording is not installed")

    def record(event: dict[str, Any]) -> None:
        if os.path.exists(path + ".down"):
            raise RuntimeError("test recorder is down")
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, default=str) + "\n")

    def unavailable() -> str | None:
        # "<records>.down" exists: the store cannot take records (as Recorder.unavailable())
        return "the audit store is down (test)" if os.path.exists(path + ".down") else None

    record.unavailable = unavailable  # type: ignore[attr-defined]
    return record


addons = list(gateway.addons)
_db = next((a for a in addons if isinstance(a, Databases)), None)
if _db is None:  # gateway.py without the database addon yet: add it the way build() will
    _holder = addons[0].holder
    _approval = next(a for a in addons if isinstance(a, Approval))
    _recorder = next(a for a in addons if isinstance(a, Recorder))
    _db = Databases(_holder, _approval, _recorder)
    addons.insert(addons.index(_recorder), _db)
_db.record_factory = _records

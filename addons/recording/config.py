"""Parse the `recorder` section of the rules (store, retention, sessions, batching).

Documented in rules/README.md (`recorder`) and docs/SCHEMA.md. No mitmproxy import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from addons.config.schema import (
    MapSection,
    expect_bool,
    expect_int,
    expect_map,
    expect_number,
    expect_str,
    expect_str_list,
)

KEYS = {"enabled", "path", "retention_days", "session_headers", "session_body_keys",
        "batch_size", "batch_interval_ms", "max_pending", "max_body_bytes", "max_batch_bytes",
        "max_pending_bytes", "redact_headers", "query_socket"}

DEFAULT_SESSION_HEADERS = ("X-Agent-Session", "X-LangGraph-Thread-Id", "X-Thread-Id",
                           "X-Run-Id")
DEFAULT_SESSION_BODY_KEYS = ("metadata.thread_id", "metadata.langgraph_thread_id",
                             "metadata.session_id", "metadata.run_id")


@dataclass(frozen=True)
class RecorderConfig:
    enabled: bool = True
    path: str | None = None  # None: <agentgate_data>/agentgate.duckdb
    retention_days: float = 0  # 0: keep forever
    session_headers: tuple[str, ...] = DEFAULT_SESSION_HEADERS
    session_body_keys: tuple[str, ...] = DEFAULT_SESSION_BODY_KEYS
    batch_size: int = 500
    batch_interval_ms: int = 200
    max_pending: int = 100_000
    # Larger values (every body and every copy of one in the flow state) are stored as
    # their first max_body_bytes plus size and sha256: one huge flow cannot poison the store.
    max_body_bytes: int = 256 * 1024
    max_batch_bytes: int = 8 * 1024 * 1024
    max_pending_bytes: int = 256 * 1024 * 1024
    redact_headers: tuple[str, ...] = ()
    query_socket: bool = True

    def describe(self) -> str:
        if not self.enabled:
            return "recording OFF (flows are not recorded)"
        keep = f"keep {self.retention_days:g} days" if self.retention_days else "keep forever"
        return (f"DuckDB {self.path or '<data>/agentgate.duckdb'}, {keep}, sessions from "
                f"{', '.join(self.session_headers) or 'connection only'}, batches of "
                f"{self.batch_size}/{self.batch_interval_ms} ms")


def parse_recorder(section: MapSection) -> RecorderConfig:
    d = expect_map(section.data, section.where(), KEYS)
    w = section.where
    kw: dict = {}
    if "enabled" in d:
        kw["enabled"] = expect_bool(d["enabled"], w("enabled"))
    if d.get("path") is not None:
        kw["path"] = expect_str(d["path"], w("path"))
    if "retention_days" in d:
        kw["retention_days"] = expect_number(d["retention_days"], w("retention_days"),
                                             minimum=0)
    for key in ("session_headers", "redact_headers"):
        if key in d:
            names = expect_str_list(d[key], w(key))
            for i, n in enumerate(names):
                if not re.fullmatch(r"[A-Za-z0-9-]+", n):
                    raise w(key).child(i).error(f"not a valid header name: {n!r}")
            kw[key] = names
    if "session_body_keys" in d:
        keys = expect_str_list(d["session_body_keys"], w("session_body_keys"))
        for i, k in enumerate(keys):
            if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", k):
                raise w("session_body_keys").child(i).error(
                    f"expected a dotted JSON path like metadata.thread_id, got {k!r}")
        kw["session_body_keys"] = keys
    if "batch_size" in d:
        kw["batch_size"] = expect_int(d["batch_size"], w("batch_size"), minimum=1,
                                      maximum=100_000)
    if "batch_interval_ms" in d:
        kw["batch_interval_ms"] = expect_int(d["batch_interval_ms"], w("batch_interval_ms"),
                                             minimum=1, maximum=60_000)
    if "max_pending" in d:
        kw["max_pending"] = expect_int(d["max_pending"], w("max_pending"), minimum=1)
    if "max_body_bytes" in d:
        # bounded: a batch must fit DuckDB's memory_limit (32 MB in the writer process,
        # raised up to 128 MB when a batch does not fit: writer.AuditWriter._grow_memory)
        kw["max_body_bytes"] = expect_int(d["max_body_bytes"], w("max_body_bytes"), minimum=0,
                                          maximum=4 * 1024 * 1024)
    if "max_batch_bytes" in d:
        kw["max_batch_bytes"] = expect_int(d["max_batch_bytes"], w("max_batch_bytes"),
                                           minimum=64 * 1024, maximum=32 * 1024 * 1024)
    if "max_pending_bytes" in d:
        kw["max_pending_bytes"] = expect_int(d["max_pending_bytes"], w("max_pending_bytes"),
                                             minimum=1024 * 1024)
    if "query_socket" in d:
        kw["query_socket"] = expect_bool(d["query_socket"], w("query_socket"))
    return RecorderConfig(**kw)

"""Placeholders shared by every replica: the masking session map in Postgres, encrypted.

A session whose requests land on different replicas must see one numbering ([EMAIL_1] is the
same address on every replica) and get its placeholders restored wherever the answer comes
back. `SharedPlaceholders` keeps the map in one Postgres table (the `AGENTGATE_STATE` / rules
`state:` database the shared approvals use):

- rows are keyed by an HMAC of (identity subject, session) — the map stays per identity AND
  session, as in memory (addons/masking/masker.py session_key) — and looked up by an HMAC of
  (entity, canonical value): neither the session id nor the value is stored in clear;
- the original value is sealed with AES-256-GCM (`cryptography`), its associated data the
  row's key and placeholder, so a ciphertext moved to another session or placeholder does
  not open;
- both keys are derived (HKDF-SHA256) from the gateway's secret (`AGENTGATE_SECRET`, or the
  file named by `AGENTGATE_SECRET_FILE`), never logged, never stored;
- rows expire with the session (`idle_ttl` after their last use) and are purged;
- placeholder numbers come from one counter row per (session, label), taken under the row
  lock, so two replicas never hand out one number for two values.

This map is never written to the audit store (the recorder stores masked bodies only).
The masking addon uses it through `SharedSession`, a masker `Session` (the hook: Masking.
_session); without a state database, or without the secret, placeholders stay in memory.
No mitmproxy import: usable and testable alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from addons.masking.masker import Session, canonical, label

SECRET_ENV = "AGENTGATE_SECRET"
SECRET_FILE_ENV = "AGENTGATE_SECRET_FILE"
MIN_SECRET_BYTES = 16
MAX_LOADED = 10_000  # entries of one session loaded per request at most (masker's default)
PURGE_EVERY_S = 60.0  # expired rows are deleted by the next load after this long

SCHEMA = """
CREATE TABLE IF NOT EXISTS agentgate_mask_values (
    skey bytea NOT NULL, vkey bytea NOT NULL, placeholder text NOT NULL,
    sealed bytea NOT NULL, expires timestamptz NOT NULL,
    PRIMARY KEY (skey, vkey));
CREATE UNIQUE INDEX IF NOT EXISTS agentgate_mask_values_ph
    ON agentgate_mask_values (skey, placeholder);
CREATE TABLE IF NOT EXISTS agentgate_mask_counters (
    skey bytea NOT NULL, label text NOT NULL, n bigint NOT NULL, expires timestamptz NOT NULL,
    PRIMARY KEY (skey, label));
"""


class SecretMissing(Exception):
    pass


def gateway_secret(env: dict[str, str] | None = None) -> bytes:
    """The gateway's secret from AGENTGATE_SECRET or AGENTGATE_SECRET_FILE (at least 16
    bytes). The message of the error names the variables, never a value."""
    env = os.environ if env is None else env
    value = env.get(SECRET_ENV, "")
    if not value and env.get(SECRET_FILE_ENV):
        try:
            value = Path(env[SECRET_FILE_ENV]).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise SecretMissing(f"{SECRET_FILE_ENV}: cannot read ({e.strerror})") from None
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise SecretMissing(f"set {SECRET_ENV} (or {SECRET_FILE_ENV}) to a secret of at least "
                            f"{MIN_SECRET_BYTES} bytes, the same on every replica")
    return value.encode()


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


class SharedPlaceholders:
    """The placeholder <-> value map of every (identity, session), in Postgres.

    `assign(session_key, entity, canonical, value, restorable)` returns the session's
    placeholder for a value (the same on every replica); `original(session_key, ph)` the value
    a restorable placeholder stands for, or None. Blocking (psycopg): call from a worker
    thread, as masking does for bodies. One connection, serialised by a lock."""

    def __init__(self, dsn: str, secret: bytes, idle_ttl: float = 3600.0) -> None:
        import psycopg
        self._aead = AESGCM(_derive(secret, b"agentgate masking values v1"))
        self._index = _derive(secret, b"agentgate masking index v1")
        self.idle_ttl = float(idle_ttl)
        self._lock = threading.Lock()
        self._purged = time.monotonic()
        self._dsn = dsn
        self._con = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        with self._lock:
            self._con.execute(SCHEMA)

    def __repr__(self) -> str:  # no DSN, no key
        return "<SharedPlaceholders>"

    def close(self) -> None:
        self._con.close()

    def _c(self) -> Any:
        """The connection, opened again after Postgres restarted or the link broke (the
        failed call itself raised: that flow was refused, the next one goes on). Under
        self._lock."""
        if self._con.closed or self._con.broken:
            import psycopg
            self._con.close()
            self._con = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
        return self._con

    # keys: HMACs, so neither session ids nor values are in the table
    def _skey(self, session_key: str) -> bytes:
        return hmac.new(self._index, b"s\x00" + session_key.encode(), hashlib.sha256).digest()

    def _vkey(self, skey: bytes, entity: str, canonical: str) -> bytes:
        return hmac.new(self._index, b"v\x00" + skey + entity.encode() + b"\x00"
                        + canonical.encode(), hashlib.sha256).digest()

    def _seal(self, skey: bytes, ph: str, entity: str, canonical: str,
              value: str | None) -> bytes:
        # entity and canonical form travel sealed too: a replica loading the session needs
        # them to number a value it meets again; `v` only for values the agent sent
        nonce = os.urandom(12)
        doc = json.dumps({"e": entity, "c": canonical, "v": value}).encode()
        return nonce + self._aead.encrypt(nonce, doc, skey + ph.encode())

    def _open(self, skey: bytes, ph: str, sealed: bytes) -> dict[str, Any] | None:
        from cryptography.exceptions import InvalidTag
        try:
            doc = json.loads(self._aead.decrypt(sealed[:12], sealed[12:], skey + ph.encode()))
        except (InvalidTag, ValueError):
            return None  # moved, edited or sealed under another secret: never restored
        return doc if isinstance(doc, dict) else None

    def assign(self, session_key: str, entity: str, label: str, canonical: str, value: str,
               restorable: bool) -> str:
        skey = self._skey(session_key)
        vkey = self._vkey(skey, entity, canonical)
        ttl = f"{self.idle_ttl} seconds"
        with self._lock, self._c().transaction():
            row = self._con.execute(
                "UPDATE agentgate_mask_values SET expires = now() + %s::interval "
                "WHERE skey = %s AND vkey = %s RETURNING placeholder, sealed IS NOT NULL",
                (ttl, skey, vkey)).fetchone()
            if row is not None:
                ph = row[0]
                if restorable:  # the latest spelling the agent used is the one it gets back
                    self._con.execute("UPDATE agentgate_mask_values SET sealed = %s WHERE "
                                      "skey = %s AND vkey = %s",
                                      (self._seal(skey, ph, entity, canonical, value), skey,
                                       vkey))
                return ph
            n = self._con.execute(
                "INSERT INTO agentgate_mask_counters VALUES (%s, %s, 1, now() + %s::interval) "
                "ON CONFLICT (skey, label) DO UPDATE SET n = agentgate_mask_counters.n + 1, "
                "expires = EXCLUDED.expires RETURNING n", (skey, label, ttl)).fetchone()[0]
            ph = f"[{label}_{n}]"
            got = self._con.execute(
                "INSERT INTO agentgate_mask_values VALUES (%s, %s, %s, %s, "
                "now() + %s::interval) ON CONFLICT (skey, vkey) DO NOTHING RETURNING placeholder",
                (skey, vkey, ph,
                 self._seal(skey, ph, entity, canonical, value if restorable else None), ttl)
            ).fetchone()
            if got is None:  # another replica numbered this value first: take its number
                ph = self._con.execute("SELECT placeholder FROM agentgate_mask_values WHERE "
                                       "skey = %s AND vkey = %s", (skey, vkey)).fetchone()[0]
            return ph

    def original(self, session_key: str, placeholder: str) -> str | None:
        skey = self._skey(session_key)
        with self._lock:
            row = self._c().execute(
                "SELECT sealed FROM agentgate_mask_values WHERE skey = %s AND placeholder = %s "
                "AND expires > now()", (skey, placeholder)).fetchone()
        doc = self._open(skey, placeholder, bytes(row[0])) if row is not None else None
        v = doc.get("v") if doc else None
        return v if isinstance(v, str) else None

    def load(self, session_key: str) -> list[tuple[str, str, str, str | None]]:
        """Every live entry of a session: (entity, canonical, placeholder, value or None)."""
        if time.monotonic() - self._purged > PURGE_EVERY_S:
            self._purged = time.monotonic()
            self.purge()
        skey = self._skey(session_key)
        with self._lock:
            # bounded like the in-memory map: the most recently used entries
            rows = self._c().execute(
                "SELECT placeholder, sealed FROM agentgate_mask_values WHERE skey = %s AND "
                "expires > now() ORDER BY expires DESC LIMIT %s",
                (skey, MAX_LOADED)).fetchall()
        out = []
        for ph, sealed in rows:
            doc = self._open(skey, ph, bytes(sealed))
            if doc and isinstance(doc.get("e"), str) and isinstance(doc.get("c"), str):
                v = doc.get("v")
                out.append((doc["e"], doc["c"], ph, v if isinstance(v, str) else None))
        return out

    def purge(self) -> int:
        """Delete expired rows (sessions idle past idle_ttl); returns how many values."""
        with self._lock, self._c().transaction():
            n = self._con.execute("DELETE FROM agentgate_mask_values WHERE expires <= now()"
                                  ).rowcount
            self._con.execute("DELETE FROM agentgate_mask_counters WHERE expires <= now()")
        return n


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class SharedSession(Session):
    """A masker `Session` backed by `SharedPlaceholders`: the same interface, so the masker
    and the body walkers use it unchanged.

    `prefetch()` (a worker thread, before a request is masked) loads the session's entries
    from every replica; known values and restores are then answered from memory. A value
    seen for the first time is numbered in Postgres — from a worker thread only (masking
    runs there when a shared store is on). On the event loop (a streamed answer, a WebSocket
    message) a new value gets `[LABEL]`: masked all the same, never restorable, no number
    that could collide with another replica's."""

    __slots__ = ("shared", "key")

    def __init__(self, shared: SharedPlaceholders, key: str, max_entries: int = 10_000) -> None:
        super().__init__(max_entries)
        self.shared = shared
        self.key = key

    def __repr__(self) -> str:
        return f"<SharedSession {len(self)} placeholders>"

    def prefetch(self) -> None:
        for entity, canon, ph, value in self.shared.load(self.key):
            self._learn(entity, canon, ph, value)

    def _learn(self, entity: str, canon: str, ph: str, value: str | None) -> None:
        with self.lock:
            self._by_value[(entity, canon)] = ph
            if value is not None:
                self._restore[ph] = value

    def placeholder(self, entity: str, value: str, restorable: bool) -> str:
        canon = canonical(entity, value)
        with self.lock:
            ph = self._by_value.get((entity, canon))
            if ph is not None and (not restorable or self._restore.get(ph) == value):
                return ph
        if _on_event_loop():
            return ph if ph is not None else f"[{label(entity)}]"
        ph = self.shared.assign(self.key, entity, label(entity), canon, value, restorable)
        self._learn(entity, canon, ph, value if restorable else None)
        return ph


def shared_from_env(idle_ttl: float, env: dict[str, str] | None = None,
                    rules_state: Any = None) -> Any:
    """SharedPlaceholders on $AGENTGATE_STATE, else on the rules' `state:` (its `resolve()`:
    addons/approval/config.py StateConfig), else None (memory, as before)."""
    env = os.environ if env is None else env
    dsn = env.get("AGENTGATE_STATE", "").strip()
    if not dsn and rules_state is not None and callable(getattr(rules_state, "resolve", None)):
        dsn = str(rules_state.resolve() or "").strip()
    if not dsn:
        return None
    return SharedPlaceholders(dsn, gateway_secret(env), idle_ttl)

"""Masking strategies and per-session state (pure: no mitmproxy import).

The detectors (addons/masking/detectors.py) say *where* a value is; this module decides *what
replaces it*:

- placeholder (default) `[EMAIL_1]`: stable within a session, so the model can tell two
  people apart and refer back to them; optionally restorable for the agent.
- redact `[REDACTED_EMAIL]`: the same text for every value of a type.
- partial: every letter/digit but the last 4 becomes `*`; separators stay
  (`****-****-****-1111`).
- hash `[EMAIL_HMAC_1a2b3c4d5e6f7a8b]`: HMAC-SHA256 of the normalised value under a key from
  the environment variable `masking.hmac_key_env`, for correlation across sessions without
  exposure. Without that variable a random key is made per process (hashes then only
  correlate within one gateway run).

The placeholder <-> value map lives in memory only, per (identity subject, session), is
bounded (sessions and entries per session, least recently used evicted) and expires after
an idle time. It is never logged, recorded or written anywhere; `Session.__repr__` hides it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import re
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable
from sys import getsizeof
from typing import Any, Protocol

log = logging.getLogger("agentgate.masking")

STRATEGIES = ("placeholder", "redact", "partial", "hash")

# Short labels for placeholders; the detectors' own names (EMAIL, PHONE, …) are used as
# they are, these only shorten the long presidio-style spellings.
LABELS = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "IBAN_CODE": "IBAN",
}

# Entities whose separators carry no meaning: "4111 1111 1111 1111" and "4111111111111111"
# are the same card and must get the same placeholder.
_DIGIT_ENTITIES = {"CREDIT_CARD", "US_SSN", "PHONE", "PHONE_NUMBER", "IBAN", "IBAN_CODE"}
_CASELESS_ENTITIES = {"EMAIL", "EMAIL_ADDRESS"}
_INVISIBLE = re.compile(r"[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f"
                        r"\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff"
                        r"\uffa0]")
_NON_ALNUM = re.compile(r"[\W_]+")
# What a placeholder looks like (for restore): `[EMAIL_12]`.
PLACEHOLDER_RE = re.compile(r"\[[A-Z][A-Z0-9_]*_\d{1,9}\]")
# A possibly unfinished placeholder at the end of a text (for streams).
PARTIAL_PLACEHOLDER_RE = re.compile(r"\[[A-Z0-9_]{0,40}\Z")
MAX_PLACEHOLDER_LEN = 64


class FindingLike(Protocol):
    entity: str
    start: int
    end: int
    value: str


class DetectorsLike(Protocol):
    max_len: int

    def find(self, text: str) -> list[Any]: ...

    def strategy_for(self, entity: str) -> str: ...


def label(entity: str) -> str:
    got = _LABEL_OF.get(entity)
    if got is None:
        got = LABELS.get(entity) or \
            _NOT_LABEL.sub("_", entity.upper()).strip("_") or "VALUE"
        if len(_LABEL_OF) < 1024:  # entity names come from the rules (built-ins, custom)
            _LABEL_OF[entity] = got
    return got


# label() per entity, worked out once (every new placeholder asks; a regex substitution
# was ~1.5 us of it)
_LABEL_OF: dict[str, str] = {}
_NOT_LABEL = re.compile(r"[^A-Z0-9_]+")


def canonical(entity: str, value: str) -> str:
    """The form under which two spellings of one value are the same value."""
    v = unicodedata.normalize("NFKC", _INVISIBLE.sub("", value))
    if entity in _DIGIT_ENTITIES:
        v = _NON_ALNUM.sub("", v).upper()
    elif entity in _CASELESS_ENTITIES:
        v = v.lower()
    return v


def partial(value: str, keep: int = 4) -> str:
    """Mask every letter/digit except the last `keep`; keep separators for readability."""
    clean = _INVISIBLE.sub("", value)
    alnum = [i for i, c in enumerate(clean) if c.isalnum()]
    if len(alnum) <= keep * 2:
        # Too short: the last 4 would reveal half the value or more.
        return "*" * len(clean)
    hidden = set(alnum[:-keep])
    return "".join("*" if i in hidden else c for i, c in enumerate(clean))


# ---------------------------------------------------------------- sessions
# What one placeholder costs in memory beyond its value's characters (the map entries, the
# key tuple, the placeholder string, the restore entry): measured with tracemalloc, ~340
# bytes for an e-mail address (tests/masking/test_session_bounds.py checks the estimate
# stays above what the interpreter really allocates).
ENTRY_OVERHEAD = 384


def _chars(text: str) -> int:
    """What a str's characters take (1, 2 or 4 bytes each, as its widest character needs;
    sys.getsizeof less an empty str's header), not len(): one emoji in a value makes every
    character of it 4 bytes, and the bounds below are in bytes."""
    return getsizeof(text) - _EMPTY_STR


_EMPTY_STR = getsizeof("")
RAW_OVERHEAD = 160  # one entry of the exact-spelling shortcut (_by_raw)
# Defaults that fit the memory target (issue 16: the gateway's peak RSS at most twice bare
# mitmdump's, ~105 MiB): all placeholder maps of a gateway together at most 16 MiB, one
# session at most 1 MiB (~2,500 e-mail addresses; 10,000 entries as before), one identity
# (all of its sessions) at most a quarter of the total.
MAX_BYTES = 16 << 20
SESSION_MAX_BYTES = 1 << 20
IDENTITY_SHARE = 4
# Session.epoch values: one sequence for every session of the process, so an epoch names
# one state of one session's map (itertools.count's next() is atomic under the GIL)
_EPOCHS = itertools.count(1)


class Session:
    """Placeholders of one (identity, session): value -> placeholder, placeholder -> value.

    Bounded in entries and in bytes (values' characters plus ENTRY_OVERHEAD each): past
    either, the session's own least recently used values are forgotten. Numbers are never
    handed out twice: a forgotten value that comes back gets the next number, so a
    placeholder never stands for two values within a session.

    `epoch` changes whenever an answer `replays` gave True may turn False: a spelling
    shortcut dropped or pointed elsewhere, a restore entry dropped or given another
    spelling. Adding values never changes it. So replays(items) True at one epoch is
    still True while the epoch is the same (bodies.Masked._replay_prefix relies on it to
    check a re-sent history once, not on every turn)."""

    __slots__ = ("_by_value", "_by_raw", "_restore", "_counters", "_max_entries", "last_used",
                 "lock", "_cost", "bytes", "_raw_bytes", "max_bytes", "_store", "_ident",
                 "epoch")

    def __init__(self, max_entries: int = 10_000, max_bytes: int = SESSION_MAX_BYTES) -> None:
        self._by_value: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._by_raw: dict[tuple[str, str], str] = {}
        self._restore: OrderedDict[str, str] = OrderedDict()
        self._counters: dict[str, int] = {}
        self._max_entries = max_entries
        self.last_used = time.monotonic()
        self.lock = threading.Lock()
        # bytes held per placeholder (its canonical form and restore value) and in all
        self._cost: dict[str, int] = {}
        self.bytes = 0
        self._raw_bytes = 0
        self.max_bytes = max_bytes
        # the SessionStore this session's bytes count against (None: on its own, or
        # dropped from the store), and its identity there
        self._store: SessionStore | None = None
        self._ident = ""
        self.epoch = next(_EPOCHS)

    def __repr__(self) -> str:  # never show values, even in a debugger or a traceback
        return f"<Session {len(self._by_value)} placeholders>"

    def __len__(self) -> int:
        return len(self._by_value)

    def _set_cost(self, ph: str, cost: int) -> None:
        self.bytes += cost - self._cost.get(ph, 0)
        self._cost[ph] = cost

    def _forget_lru(self) -> int:
        """Drop the least recently used value (self.lock held); the bytes freed."""
        _, old = self._by_value.popitem(last=False)
        self._restore.pop(old, None)
        self.epoch = next(_EPOCHS)
        freed = self._cost.pop(old, 0)
        self.bytes -= freed
        return freed

    def placeholder(self, entity: str, value: str, restorable: bool) -> str:
        raw_key = (entity, value)
        with self.lock:
            # the exact spelling seen before: skip normalising it again
            ph = self._by_raw.get(raw_key)
            if ph is not None and (not restorable or self._restore.get(ph) == value):
                return ph
        key = (entity, canonical(entity, value))
        with self.lock:
            before = self.bytes
            ph = self._by_value.get(key)
            if ph is None:
                lab = label(entity)
                n = self._counters.get(lab, 0) + 1
                self._counters[lab] = n
                ph = f"[{lab}_{n}]"
                self._by_value[key] = ph
                self._set_cost(ph, ENTRY_OVERHEAD + _chars(key[1]) + _chars(ph))
            else:
                self._by_value.move_to_end(key)
            if len(self._by_raw) >= self._max_entries or \
                    self._raw_bytes > self.max_bytes // 2:
                self._by_raw.clear()  # only a cache: rebuilt as values come back
                self.bytes -= self._raw_bytes
                self._raw_bytes = 0
                self.epoch = next(_EPOCHS)
            was = self._by_raw.get(raw_key)
            if was is None:
                c = RAW_OVERHEAD + _chars(value)
                self._raw_bytes += c
                self.bytes += c
            elif was != ph:
                self.epoch = next(_EPOCHS)
            self._by_raw[raw_key] = ph
            # Only values the agent itself sent may come back to it: a value the model
            # produced on its own keeps its placeholder on the way back too.
            # (the latest spelling the agent used is the one it gets back)
            if restorable:
                spelled = self._restore.get(ph)
                if spelled is not None and spelled != value:
                    self.epoch = next(_EPOCHS)
                self._restore[ph] = value
                self._restore.move_to_end(ph)
                self._set_cost(ph, ENTRY_OVERHEAD + _chars(key[1]) + _chars(ph) + _chars(value))
                if len(self._restore) > self._max_entries:
                    self._restore.popitem(last=False)
                    self.epoch = next(_EPOCHS)
            # over its own bounds: the spelling shortcut goes first (only a cache), then
            # this session's least recently used values (never the one just asked for:
            # it is the most recent)
            if self.bytes > self.max_bytes and self._raw_bytes:
                self._by_raw.clear()
                self.bytes -= self._raw_bytes
                self._raw_bytes = 0
                self.epoch = next(_EPOCHS)
            while len(self._by_value) > self._max_entries or (
                    self.bytes > self.max_bytes and len(self._by_value) > 1):
                self._forget_lru()
            delta = self.bytes - before
        store = self._store
        if store is not None and delta:
            store._account(self, delta)
        return ph

    def placeholders(self, items: list[tuple[str, str]], restorable: bool) -> list[str]:
        """[placeholder(entity, value, restorable) for each item], in order: the same calls'
        answers and state, with one lock for every run of values on the fast path (a
        spelling seen before: no state changes) instead of one per value; a value off it
        is handed to placeholder() itself, before the items after it are looked at."""
        out: list[str] = []
        add = out.append
        i, n = 0, len(items)
        while i < n:
            with self.lock:
                by_raw, back = self._by_raw, self._restore
                while i < n:
                    ph = by_raw.get(items[i])
                    if ph is None or (restorable and back.get(ph) != items[i][1]):
                        break
                    add(ph)
                    i += 1
            if i < n:
                add(self.placeholder(items[i][0], items[i][1], restorable))
                i += 1
        return out

    def replays(self, items: Iterable[tuple[str, str, str]], restorable: bool) -> bool:
        """Would `placeholder(entity, value, restorable)` give `ph` for every (entity,
        value, ph), each on its fast path (a spelling seen before: no state changes)? One
        lock for a whole cached message instead of one call per value; False: ask one by
        one (bodies.Masked._replay), which is what happened before. Each distinct item is
        looked at once (a check changes nothing, so a repeat gets the same answer: a
        message naming the same address a hundred times costs one check)."""
        distinct = dict.fromkeys(items)
        with self.lock:
            by_raw, back = self._by_raw, self._restore
            for entity, value, ph in distinct:
                if by_raw.get((entity, value)) != ph or (restorable
                                                         and back.get(ph) != value):
                    return False
        return True

    def original(self, placeholder: str) -> str | None:
        with self.lock:
            return self._restore.get(placeholder)

    def restore(self, text: str, escape: Callable[[str], str] | None = None) -> str:
        """Replace known placeholders in `text` by their originals."""
        if "[" not in text or not self._restore:
            return text

        def sub(m: re.Match[str]) -> str:
            orig = self.original(m.group(0))
            if orig is None:
                return m.group(0)
            return escape(orig) if escape else orig

        return PLACEHOLDER_RE.sub(sub, text)


class SessionStore:
    """Bounded, expiring map of sessions. Thread-safe.

    Bounds: `max_sessions` sessions and `max_bytes` bytes of placeholders in all; each
    session `session_max_bytes` (its own least recently used values go first); and each
    identity (the subject part of masker.session_key) at most 1/`identity_share` of
    both, so that one identity opening sessions or sending values without end evicts its
    own sessions, least recently used first, never everyone else's. Past the total with
    every identity within its share, the least recently used session overall goes.
    A dropped session's placeholders are gone: the same session starts again at
    `[EMAIL_1]` (rules/README.md, masking: what eviction means)."""

    def __init__(self, max_sessions: int = 10_000, idle_ttl: float = 3600.0,
                 max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = MAX_BYTES, session_max_bytes: int = SESSION_MAX_BYTES,
                 identity_share: int = IDENTITY_SHARE) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        # per identity: its sessions in least recently used order, and its bytes
        self._by_ident: dict[str, OrderedDict[str, Session]] = {}
        self._ident_bytes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.max_sessions = max_sessions
        self.idle_ttl = idle_ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.session_max_bytes = min(session_max_bytes, max_bytes)
        self.identity_share = max(1, identity_share)
        self.bytes = 0
        self._clock = clock

    def __len__(self) -> int:
        return len(self._sessions)

    def __repr__(self) -> str:
        return f"<SessionStore {len(self._sessions)} sessions, {self.bytes} bytes>"

    @property
    def identity_max_sessions(self) -> int:
        return max(1, self.max_sessions // self.identity_share)

    @property
    def identity_max_bytes(self) -> int:
        return max(self.session_max_bytes, self.max_bytes // self.identity_share)

    @staticmethod
    def _identity(key: str) -> str:
        sub, sep, _ = key.partition("\x00")
        return sub if sep else key

    def get(self, key: str) -> Session:
        now = self._clock()
        with self._lock:
            self._expire(now)
            s = self._sessions.get(key)
            ident = self._identity(key)
            if s is None:
                s = Session(self.max_entries, self.session_max_bytes)
                s._store, s._ident = self, ident
                self._sessions[key] = s
                own = self._by_ident.setdefault(ident, OrderedDict())
                own[key] = s
                self._ident_bytes.setdefault(ident, 0)
                self._shrink(ident, keep=key)
            else:
                self._sessions.move_to_end(key)
                self._by_ident[ident].move_to_end(key)
            s.last_used = now
            return s

    def _account(self, s: Session, delta: int) -> None:
        """A session's placeholders grew or shrank by `delta` bytes (its lock released)."""
        with self._lock:
            if s._store is not self:
                return  # dropped meanwhile: its bytes were taken off then
            self.bytes += delta
            self._ident_bytes[s._ident] = self._ident_bytes.get(s._ident, 0) + delta
            if delta > 0:
                self._shrink(s._ident, keep=None, growing=s)

    def _drop(self, key: str) -> None:  # self._lock held
        s = self._sessions.pop(key)
        own = self._by_ident.get(s._ident)
        if own is not None:
            own.pop(key, None)
        if own:
            self._ident_bytes[s._ident] -= s.bytes
        else:
            self._by_ident.pop(s._ident, None)
            self._ident_bytes.pop(s._ident, None)
        self.bytes -= s.bytes
        s._store = None  # a flow still holding it masks on; it no longer counts here

    def _shrink(self, ident: str, keep: str | None, growing: Session | None = None
                ) -> None:
        """Back within bounds (self._lock held): first the identity over its share drops
        its own least recently used sessions, then the oldest sessions overall go. The
        session being handed out (`keep`) or growing stays: it is the one in use."""
        own = self._by_ident.get(ident)
        while own and (len(own) > self.identity_max_sessions
                       or self._ident_bytes.get(ident, 0) > self.identity_max_bytes):
            victim = next(iter(own))
            if victim == keep or own[victim] is growing:
                if len(own) == 1:
                    break
                own.move_to_end(victim)  # (only its order among its own changes)
                victim = next(iter(own))
            self._drop(victim)
        while self._sessions and (len(self._sessions) > self.max_sessions
                                  or self.bytes > self.max_bytes):
            victim = next(iter(self._sessions))
            s = self._sessions[victim]
            if victim == keep or s is growing:
                if len(self._sessions) == 1:
                    break
                self._sessions.move_to_end(victim)
                continue
            self._drop(victim)

    def _expire(self, now: float) -> None:
        # Oldest first: stop at the first session still in use.
        while self._sessions:
            key, s = next(iter(self._sessions.items()))
            if now - s.last_used <= self.idle_ttl:
                break
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._sessions):
                self._drop(key)


def session_key(subject: str | None, session: str) -> str:
    """Maps are per identity AND session: a guessed session id of another agent is useless."""
    return f"{subject or '-'}\x00{session}"


# ---------------------------------------------------------------- findings
Findings = dict[str, dict[str, Any]]


def count(findings: Findings, entity: str, strategy: str, n: int = 1) -> None:
    entry = findings.get(entity)
    if entry is None:
        findings[entity] = {"count": n, "strategy": strategy}
    else:
        entry["count"] += n


def merge(into: Findings, other: Findings) -> Findings:
    for entity, entry in other.items():
        count(into, entity, entry["strategy"], entry["count"])
    return into


# ---------------------------------------------------------------- the masker
def hmac_key_from_env(env_name: str | None) -> tuple[bytes, bool]:
    """(key, from_env). Without the variable, a random per-process key."""
    if env_name:
        raw = os.environ.get(env_name)
        if raw:
            return raw.encode("utf-8"), True
    return secrets.token_bytes(32), False


# object keys Masker.plain_key remembers per masker, and the longest it looks at (a longer
# key is always walked)
PLAIN_KEYS_MAX = 4096
PLAIN_KEY_MAX_LEN = 64

# fewer replacements than this are asked one by one: the batch's own set-up costs more
BATCH_MIN = 8


class Masker:
    """Replace findings by their strategy's text. One per rules version; sessions shared."""

    def __init__(self, detectors: DetectorsLike, hmac_key: bytes | None = None,
                 sessions: SessionStore | None = None) -> None:
        self.detectors = detectors
        self._key = hmac_key if hmac_key is not None else secrets.token_bytes(32)
        self.sessions = sessions if sessions is not None else SessionStore()
        self._strategy_cache: dict[str, str] = {}
        # URL paths the detectors found nothing in (bodies.Masked.url_path): a path does
        # not depend on the session, and most requests of a gateway share a few paths
        self.clean_paths: dict[str, None] = {}
        # JSON object keys plain_key() found nothing in (the same few field names come in
        # every body): bounded, keys being the sender's to choose
        self.plain_keys: dict[str, None] = {}

    def __repr__(self) -> str:
        return "<Masker>"

    @property
    def max_len(self) -> int:
        return int(self.detectors.max_len)

    @property
    def context_len(self) -> int:
        """Already-sent characters a stream keeps in front of new text (left context)."""
        return int(getattr(self.detectors, "context_len", 128))

    def holdback(self, text: str) -> int:
        """How many trailing characters of a stream buffer a match could still extend into
        (the detectors' own estimate when they have one, else the longest match)."""
        fn = getattr(self.detectors, "holdback", None)
        if fn is None:
            return min(self.max_len, len(text))
        return int(fn(text))

    def find(self, text: str) -> list[Any]:
        return self.detectors.find(text) if text else []

    def plain_key(self, key: str) -> bool:
        """Is `key` a JSON object key the detectors provably find nothing in, wherever it
        stands in a body (bodies._Slots then leaves it out of the text they read)? Only
        the detectors can tell (DetectorSet.plain_word): a key of letters and '_' is not
        plain by its look (a Hugging Face token, an AWS access key id or a Stripe key
        can be just that). Remembered when it is (bounded); anything else is walked."""
        if key in self.plain_keys:
            return True
        plain = getattr(self.detectors, "plain_word", None)
        if len(key) > PLAIN_KEY_MAX_LEN or plain is None or not plain(key):
            return False
        if len(self.plain_keys) < PLAIN_KEYS_MAX:
            self.plain_keys[key] = None
        return True

    def strategy(self, entity: str) -> str:
        s = self._strategy_cache.get(entity)
        if s is None:
            s = self.detectors.strategy_for(entity)
            if s not in STRATEGIES:
                s = "placeholder"
            self._strategy_cache[entity] = s
        return s

    def hash_text(self, entity: str, value: str) -> str:
        digest = hmac.new(self._key, canonical(entity, value).encode("utf-8"),
                          hashlib.sha256).hexdigest()
        return f"[{label(entity)}_HMAC_{digest[:16]}]"

    def replacement(self, entity: str, value: str, session: Session | None,
                    restorable: bool = True) -> str:
        strategy = self.strategy(entity)
        if strategy == "redact":
            return f"[REDACTED_{label(entity)}]"
        if strategy == "partial":
            return partial(value)
        if strategy == "hash":
            return self.hash_text(entity, value)
        if session is None:
            session = Session()
        return session.placeholder(entity, value, restorable)

    def replacements(self, items: list[tuple[str, str]], session: Session | None,
                     restorable: bool = True) -> list[str]:
        """[replacement(entity, value, session, restorable) for each (entity, value)]: the
        same answers, in one batch when every entity is placeholdered in a plain Session
        (Session.placeholders: one lock per run of known values)."""
        if len(items) >= BATCH_MIN and type(session) is Session and all(
                self.strategy(e) == "placeholder" for e in {e for e, _ in items}):
            return session.placeholders(items, restorable)
        return [self.replacement(e, v, session, restorable) for e, v in items]

    def apply(self, text: str, found: Iterable[Any], session: Session | None,
              findings: Findings, *, restorable: bool = True, restore: bool = False,
              escape: Callable[[str], str] | None = None) -> str:
        """`text` with every finding replaced; with `restore`, known placeholders in the
        untouched parts are put back to their originals (escaped by `escape`)."""
        out: list[str] = []
        pos = 0
        for f in found:
            if f.start < pos:  # overlapping findings: the first one wins
                continue
            gap = text[pos:f.start]
            out.append(session.restore(gap, escape) if restore and session else gap)
            out.append(self.replacement(f.entity, f.value, session, restorable))
            count(findings, f.entity, self.strategy(f.entity))
            pos = f.end
        gap = text[pos:]
        out.append(session.restore(gap, escape) if restore and session else gap)
        return "".join(out)

    def mask_text(self, text: str, session: Session | None, findings: Findings, *,
                  restorable: bool = True, restore: bool = False,
                  escape: Callable[[str], str] | None = None) -> str:
        found = self.find(text)
        if not found and not (restore and session is not None and "[" in text):
            return text
        return self.apply(text, found, session, findings, restorable=restorable,
                          restore=restore, escape=escape)

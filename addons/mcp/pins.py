"""Tool pinning against a "rug pull", and the tool-description scan. Pure; no mitmproxy.

The first `tools/list` seen for a scope (a server, or a server and an identity) records
each tool's fingerprint: sha256 over the canonical JSON of its name, description,
inputSchema, outputSchema and annotations (keys sorted, no whitespace; `title` and
`_meta` left out: they are display hints and server bookkeeping). A later list with a
different fingerprint for a pinned tool marks it changed; it stays changed (its calls
blocked or held, per `mcp.pinning.on_change`) until an operator accepts the new
definition. A new tool in a later list is pinned as it is first seen.

The store is one small JSON file shared by the gateway and `agentgate mcp pins`: writes
are atomic (temporary file + rename) under an advisory lock, and the gateway re-reads the
file when its modification time changes, so an `accept` takes effect on the next call.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FINGERPRINT_KEYS = ("name", "description", "inputSchema", "outputSchema", "annotations")


def fingerprint(tool: dict[str, Any]) -> str:
    canon = {k: tool.get(k) for k in FINGERPRINT_KEYS}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------- description scan
# Phrases seen in published tool-poisoning attacks (Invariant Labs' "tool poisoning",
# hidden <IMPORTANT> blocks, instructions to keep the user in the dark, reads of key files).
_MARKERS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(rx, re.IGNORECASE)) for name, rx in (
        ("ignore-instructions", r"\b(ignore|disregard|forget)\s+(all\s+|any\s+|the\s+)?"
                                r"(previous|prior|above|earlier|other)\s+"
                                r"(instructions?|prompts?|rules|directions)"),
        ("hidden-block", r"<\s*/?\s*(important|system|instructions?|secret|hidden)\s*>"),
        ("conceal-from-user", r"\b(do\s+not|don'?t|never)\s+(tell|inform|mention|reveal|"
                              r"notify|show)\s+(this\s+to\s+)?(the\s+)?user"),
        ("sensitive-file", r"(~|\$home|%userprofile%)[/\\]\.(ssh|aws|gnupg|config|kube)|"
                           r"\bid_(rsa|ed25519|ecdsa)\b|(^|[/\s])\.env\b|mcp\.json|"
                           r"\.netrc\b|credentials\.json"),
        ("role-override", r"\byou\s+are\s+now\b|\bnew\s+instructions\s*:|"
                          r"\bsystem\s+prompt\b"),
        ("exfiltration", r"\b(send|post|forward|upload|exfiltrate|leak)\b.{0,60}"
                         r"\bhttps?://"),
    ))
_ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad")
_BIDI = frozenset("\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _strings(node: Any, out: list[str], depth: int = 0) -> None:
    if depth > 32:
        return
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, dict):
        for k, v in node.items():
            out.append(str(k))
            _strings(v, out, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _strings(v, out, depth + 1)


def scan_tool(tool: dict[str, Any]) -> list[str]:
    """Reasons (names, never the text) a tool's definition looks like an injection: known
    markers in its description or schema texts, and invisible characters (zero-width,
    bidirectional controls, Unicode tag characters) anywhere in them."""
    texts: list[str] = []
    for key in ("name", "title", "description", "inputSchema", "outputSchema",
                "annotations"):
        _strings(tool.get(key), texts)
    reasons: set[str] = set()
    for text in texts:
        for ch in text:
            if ch in _ZERO_WIDTH:
                reasons.add("hidden:zero-width")
            elif ch in _BIDI:
                reasons.add("hidden:bidi")
            elif 0xE0000 <= ord(ch) <= 0xE007F:
                reasons.add("hidden:tag-characters")
        norm = unicodedata.normalize("NFKC", text)
        for name, rx in _MARKERS:
            if rx.search(norm):
                reasons.add(f"marker:{name}")
    return sorted(reasons)


# ---------------------------------------------------------------- the store
def scope_key(server: str, who: str | None, per_identity: bool) -> str:
    """The pin set of `server` (per identity: `who`, frame/principal.principal: issuer AND
    subject, JSON-written; "-" without a token)."""
    return f"{server}|{who or '-'}" if per_identity else server


def _legacy_scope(scope: str) -> str | None:
    """The key the same subject's pin set had before pins were kept per issuer."""
    server, iss, sub = scope_identity(scope)
    return f"{server}|{sub}" if iss is not None and sub is not None else None


def scope_identity(scope: str) -> tuple[str, str | None, str | None]:
    """(server, issuer, subject) of a scope key; issuer None for a key of the subject
    alone (written before pins were kept per issuer too), both None without identity."""
    server, sep, who = scope.partition("|")
    if not sep or who == "-":
        return server, None, None
    if who.startswith("["):
        try:
            iss, sub = json.loads(who)
            return server, str(iss), str(sub)
        except (ValueError, TypeError):
            pass
    return server, None, who


class PinStore:
    """{scope: {tool: {"sha256", "pinned_at", "changed": sha256|None, "changed_at",
    "suspicious": [reasons], "accepted": bool}}} in one JSON file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, dict[str, Any]]] = {}
        self._mtime: int | None = None

    # -- file
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(f"{self.path}.lock", "a+") as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lf, fcntl.LOCK_UN)

    def _read(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._data, self._mtime = {}, None
            return
        if st.st_mtime_ns == self._mtime:
            return
        text = self.path.read_text(encoding="utf-8")
        data = json.loads(text) if text.strip() else {}
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{self.path}: not a pin store")
        self._data, self._mtime = data, st.st_mtime_ns

    def _write(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".pins-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._mtime = self.path.stat().st_mtime_ns

    def refresh(self) -> None:
        """Pick up changes another process (the CLI) made."""
        with self._locked():
            self._read()

    # -- the gateway's side
    def status(self, scope: str, tool: str) -> tuple[str | None, list[str]]:
        """("same" | "changed" | None when not pinned, suspicious reasons). Uses what
        was last read (call refresh() first, off the event loop)."""
        pins = self._data.get(scope)
        if pins is None:
            pins = self._data.get(_legacy_scope(scope) or "", {})
        entry = pins.get(tool)
        if entry is None:
            return None, []
        state = "changed" if entry.get("changed") else "same"
        sus = [] if entry.get("accepted") else list(entry.get("suspicious") or ())
        return state, sus

    _scans: dict[tuple[str, str], list[str]] = {}

    @classmethod
    def _scan(cls, fp: str, tool: dict[str, Any]) -> list[str]:
        """scan_tool, remembered by definition: a server lists the same tools every
        session, and the scan is most of a list's cost (bounded, cleared when full)."""
        title = tool.get("title")
        key = (fp, title if isinstance(title, str) else "")
        got = cls._scans.get(key)
        if got is None:
            if len(cls._scans) >= 4096:
                cls._scans.clear()
            got = cls._scans[key] = scan_tool(tool)
        return list(got)

    def observe(self, scope: str, tools: list[dict[str, Any]], now: float | None = None
                ) -> dict[str, tuple[str, list[str]]]:
        """Record a tools/list: {tool: (new | same | changed, suspicious reasons)}."""
        now = time.time() if now is None else now
        out: dict[str, tuple[str, list[str]]] = {}
        with self._locked():
            self._read()
            dirty = False
            legacy = _legacy_scope(scope)
            if scope not in self._data and legacy in self._data:
                # the set this subject had before pins were kept per issuer: each issuer's
                # subject starts from it (a change since is still a change), then apart
                self._data[scope] = json.loads(json.dumps(self._data[legacy]))
                dirty = True
            pins = self._data.setdefault(scope, {})
            for tool in tools:
                name = tool.get("name")
                if not isinstance(name, str):
                    continue
                fp = fingerprint(tool)
                reasons = self._scan(fp, tool)
                entry = pins.get(name)
                if entry is None:
                    pins[name] = {"sha256": fp, "pinned_at": now, "changed": None,
                                  "suspicious": reasons, "accepted": False}
                    dirty = True
                    out[name] = ("new", reasons)
                elif entry["sha256"] == fp:
                    out[name] = ("changed" if entry.get("changed") else "same", reasons)
                else:
                    if entry.get("changed") != fp:
                        entry["changed"], entry["changed_at"] = fp, now
                        entry["suspicious"], entry["accepted"] = reasons, False
                        dirty = True
                    out[name] = ("changed", reasons)
            if dirty:
                self._write()
        return out

    # -- the operator's side
    def list(self) -> dict[str, dict[str, dict[str, Any]]]:
        with self._locked():
            self._read()
            return json.loads(json.dumps(self._data))

    def accept(self, scope: str, tool: str) -> bool:
        """Accept a tool's current definition (the changed one, and any scan findings)."""
        with self._locked():
            self._read()
            entry = self._data.get(scope, {}).get(tool)
            if entry is None:
                return False
            if entry.get("changed"):
                entry["sha256"], entry["changed"] = entry["changed"], None
            entry["accepted"], entry["accepted_at"] = True, time.time()
            self._write()
            return True

    def reset(self, scope: str | None = None, tool: str | None = None) -> int:
        """Forget pins (all, a scope's, or one tool's): re-pinned when next listed."""
        with self._locked():
            self._read()
            n = 0
            for s in list(self._data):
                if scope is not None and s != scope:
                    continue
                if tool is None:
                    n += len(self._data.pop(s))
                elif tool in self._data[s]:
                    del self._data[s][tool]
                    n += 1
            self._write()
            return n

    def scopes(self) -> list[str]:
        return list(self._data)

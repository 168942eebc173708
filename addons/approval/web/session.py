"""Reviewer sessions and logins in progress, held server-side (pure logic, no tornado).

The browser holds only a random id in a signed cookie; everything else (who, groups,
CSRF token, expiry) stays here, so a stolen page or a log never carries a reviewer's
groups or tokens, and logging out ends the session for real. Both tables are bounded:
the oldest entries are dropped first, and a login that is not completed within
`LOGIN_TTL` seconds is forgotten.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

LOGIN_TTL = 600.0
MAX_LOGINS = 1000
MAX_SESSIONS = 10000


@dataclass
class Session:
    id: str
    sub: str
    groups: tuple[str, ...]
    issuer: str
    created: float
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def csrf_ok(self, token: str | None) -> bool:
        """The CSRF token of a form post: bound to this session, compared in constant time."""
        return isinstance(token, str) and hmac.compare_digest(token.encode(),
                                                              self.csrf.encode())


@dataclass(frozen=True)
class PendingLogin:
    """One authorization request in flight: what the callback must find again."""

    id: str
    state: str
    nonce: str
    verifier: str  # PKCE code_verifier (RFC 7636), never leaves the gateway
    next_path: str
    created: float
    redirect_url: str = ""  # sent again, identical, with the code (RFC 6749 4.1.3)

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode("ascii")).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def safe_next(path: str | None) -> str:
    """Where to go after login: a path on this page only (no open redirect)."""
    if (not path or not path.startswith("/ui/") or path.startswith("//")
            or "\\" in path or any(ord(c) < 0x21 for c in path)):
        return "/ui/"
    return path


class SessionTable:
    def __init__(self, *, clock: Callable[[], float] = time.time,
                 max_sessions: int = MAX_SESSIONS, max_logins: int = MAX_LOGINS) -> None:
        self.clock = clock
        self.max_sessions = max_sessions
        self.max_logins = max_logins
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._logins: OrderedDict[str, PendingLogin] = OrderedDict()

    # ------------------------------------------------------------ logins in progress
    def begin_login(self, next_path: str | None, redirect_url: str = "") -> PendingLogin:
        now = self.clock()
        self._prune_logins(now)
        login = PendingLogin(id=secrets.token_urlsafe(24), state=secrets.token_urlsafe(24),
                             nonce=secrets.token_urlsafe(24),
                             verifier=secrets.token_urlsafe(48),  # 64 chars: 43..128 allowed
                             next_path=safe_next(next_path), created=now,
                             redirect_url=redirect_url)
        self._logins[login.id] = login
        while len(self._logins) > self.max_logins:
            self._logins.popitem(last=False)
        return login

    def finish_login(self, login_id: str | None, state: str | None) -> PendingLogin | None:
        """The login this browser started, if `state` matches; used once either way."""
        if not login_id:
            return None
        login = self._logins.pop(login_id, None)
        if login is None or self.clock() - login.created > LOGIN_TTL:
            return None
        if not isinstance(state, str) or not hmac.compare_digest(state.encode(),
                                                                 login.state.encode()):
            return None
        return login

    def _prune_logins(self, now: float) -> None:
        while self._logins:
            first = next(iter(self._logins.values()))
            if now - first.created <= LOGIN_TTL:
                break
            self._logins.popitem(last=False)

    # ------------------------------------------------------------ sessions
    def create(self, sub: str, groups: tuple[str, ...], issuer: str, lifetime: float
               ) -> Session:
        now = self.clock()
        s = Session(id=secrets.token_urlsafe(32), sub=sub, groups=groups, issuer=issuer,
                    created=now, expires=now + lifetime)
        self._sessions[s.id] = s
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return s

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        s = self._sessions.get(session_id)
        if s is None:
            return None
        if self.clock() >= s.expires:
            self._sessions.pop(session_id, None)
            return None
        return s

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def clear(self) -> None:
        self._sessions.clear()
        self._logins.clear()

    def __len__(self) -> int:
        return len(self._sessions)

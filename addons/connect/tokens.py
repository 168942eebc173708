"""Where the connector's token comes from: a file, a command or an environment variable.

Pure logic (no mitmproxy, no asyncio): each source's `get()` blocks (file read, subprocess),
so the forwarder calls it in a worker thread. Every failure is a `TokenSourceError` whose
message never contains the token, nor anything a token command printed on stdout.
"""

from __future__ import annotations

import abc
import base64
import binascii
import json
import math
import os
import re
import shlex
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# A token larger than this is not an OIDC token; the gateway refuses oversized tokens too.
MAX_TOKEN_BYTES = 16 * 1024
# Token commands print a token, maybe a newline; anything more is a broken command.
MAX_COMMAND_OUTPUT = 64 * 1024
# An opaque (non-JWT) token from a command has no exp to cache it by: run it at most this often.
OPAQUE_CACHE_SECONDS = 60.0
# A command's JWT is renewed this long before its exp, at most (a quarter of its remaining
# lifetime for short tokens), so no connection starts with a token about to expire.
REFRESH_BEFORE = 60.0
# Printable ASCII without space: a token goes into a header value, so CR/LF or other control
# characters from a file or command must never reach the gateway (header injection).
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
# what a JWT looks like inside a command's error output, to blank it before it is shown
_JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


class TokenSourceError(Exception):
    """The token source failed or produced an unusable token. The message is safe to show
    (stderr, the client's error answer): it never contains a token."""


@dataclass(frozen=True)
class Token:
    value: str
    exp: float | None  # the JWT's exp (unverified), None for an opaque token


def jwt_exp(token: str) -> float | None:
    """The `exp` claim of a JWT's payload, read WITHOUT verifying anything (the gateway
    verifies; the connector only needs to know when to fetch a new one). None when the token
    is not a JWT or has no numeric exp."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    seg = parts[1]
    try:
        payload = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


def check_token(raw: str, origin: str, now: float) -> Token:
    """Strip surrounding whitespace and check the token can be sent and is not expired."""
    value = raw.strip()
    if not value:
        raise TokenSourceError(f"{origin} is empty")
    if len(value) > MAX_TOKEN_BYTES:
        raise TokenSourceError(f"{origin} holds {len(value)} bytes, more than a token "
                               f"({MAX_TOKEN_BYTES} at most)")
    if not _TOKEN_RE.fullmatch(value):
        raise TokenSourceError(f"{origin} holds characters a token cannot contain "
                               "(whitespace, control or non-ASCII characters)")
    exp = jwt_exp(value)
    if exp is not None and exp <= now:
        raise TokenSourceError(f"the token from {origin} expired {int(now - exp)} s ago "
                               "(is the token being rotated?)")
    return Token(value, exp)


class TokenSource(abc.ABC):
    """One of the three sources; `get()` returns a usable, unexpired token or raises."""

    describe: str = "token source"

    @abc.abstractmethod
    def get(self) -> str:
        """A usable, unexpired token; raises TokenSourceError."""


class FileToken(TokenSource):
    """A token file, re-read whenever its identity, size or mtime changes: the kubelet rotates
    a projected service-account token by swapping a symlink, editors and scripts rewrite in
    place. A cached token is still checked for expiry on every call."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.describe = f"token file {path}"
        self._clock = clock
        self._lock = threading.Lock()
        self._key: tuple[int, int, int, int] | None = None
        self._token: Token | None = None

    def get(self) -> str:
        with self._lock:
            try:
                st = os.stat(self.path)  # follows the kubelet's ..data symlink
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if key != self._key or self._token is None:
                    if not stat.S_ISREG(st.st_mode):
                        # a FIFO or device would block the reader or never end
                        raise TokenSourceError(f"{self.describe} is not a regular file")
                    if st.st_size > MAX_TOKEN_BYTES + 64:
                        raise TokenSourceError(f"{self.describe} holds {st.st_size} bytes, "
                                               f"more than a token ({MAX_TOKEN_BYTES} at most)")
                    with open(self.path, "rb") as f:
                        data = f.read(MAX_TOKEN_BYTES + 65)
                    self._token = None
                    self._key = key
                    try:
                        text = data.decode("ascii")
                    except UnicodeDecodeError:
                        raise TokenSourceError(
                            f"{self.describe} holds characters a token cannot contain "
                            "(non-ASCII)") from None
                    self._token = check_token(text, self.describe, self._clock())
            except OSError as e:
                self._key, self._token = None, None
                raise TokenSourceError(f"cannot read {self.describe}: "
                                       f"{e.strerror or type(e).__name__}") from None
            except TokenSourceError:
                self._token = None  # a bad file is re-read (and re-reported) next time
                self._key = None
                raise
            tok = self._token
            now = self._clock()
            if tok.exp is not None and tok.exp <= now:
                raise TokenSourceError(f"the token from {self.describe} expired "
                                       f"{int(now - tok.exp)} s ago (is the token being "
                                       "rotated?)")
            return tok.value


class EnvToken(TokenSource):
    """An environment variable, read on every call (the simplest case; it cannot rotate)."""

    def __init__(self, var: str, clock: Callable[[], float] = time.time,
                 environ: dict[str, str] | None = None) -> None:
        self.var = var
        self.describe = f"environment variable {var}"
        self._clock = clock
        self._environ = environ if environ is not None else os.environ

    def get(self) -> str:
        raw = self._environ.get(self.var)
        if raw is None:
            raise TokenSourceError(f"{self.describe} is not set")
        return check_token(raw, self.describe, self._clock()).value


class CommandToken(TokenSource):
    """A command (no shell: `shlex.split`) that prints a token on stdout, e.g.
    `gcloud auth print-identity-token --audiences=agentgate`. Its JWT is cached until shortly
    before its `exp` (an opaque token for OPAQUE_CACHE_SECONDS); concurrent callers share one
    run. A failed run is not cached: the next connection tries again."""

    def __init__(self, command: str, timeout: float = 20.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("--token-command is empty")
        # the program's name only: arguments may carry secrets (client secrets, passwords)
        self.describe = f"token command {os.path.basename(self.argv[0])!r}"
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._token: Token | None = None
        self._renew_at = 0.0
        self.runs = 0  # how often the command ran (tests, diagnostics)

    def get(self) -> str:
        with self._lock:  # one run at a time; the others wait for its result
            now = self._clock()
            tok = self._token
            if tok is not None and now < self._renew_at and (tok.exp is None or tok.exp > now):
                return tok.value
            self._token = None
            tok = self._run()
            now = self._clock()
            if tok.exp is None:
                self._renew_at = now + OPAQUE_CACHE_SECONDS
            else:
                self._renew_at = tok.exp - min(REFRESH_BEFORE, max(0.0, tok.exp - now) / 4)
            self._token = tok
            return tok.value

    def _run(self) -> Token:
        self.runs += 1
        try:
            p = subprocess.run(self.argv, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise TokenSourceError(f"{self.describe} did not finish within "
                                   f"{self.timeout:g} s") from None
        except OSError as e:
            raise TokenSourceError(f"cannot run {self.describe}: "
                                   f"{e.strerror or type(e).__name__}") from None
        if p.returncode != 0:
            raise TokenSourceError(f"{self.describe} failed (exit status {p.returncode})"
                                   + _stderr_hint(p.stderr))
        if len(p.stdout) > MAX_COMMAND_OUTPUT:
            raise TokenSourceError(f"{self.describe} printed {len(p.stdout)} bytes, more than "
                                   "a token")
        try:
            text = p.stdout.decode("ascii")
        except UnicodeDecodeError:
            raise TokenSourceError(f"{self.describe} printed characters a token cannot "
                                   "contain (non-ASCII)") from None
        return check_token(text, self.describe, self._clock())


def _stderr_hint(stderr: bytes) -> str:
    """The command's last stderr line, short, with anything JWT-shaped blanked out."""
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return ""
    line = _JWT_LIKE.sub("[redacted]", lines[-1])
    line = "".join(c if c.isprintable() else "?" for c in line)[:200]
    return f": {line}"

"""Token sources (pure): file rotation, command caching by exp, failures that never show a token."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from addons.connect import tokens
from addons.connect.tokens import (
    CommandToken,
    EnvToken,
    FileToken,
    TokenSourceError,
    check_token,
    jwt_exp,
)
from tests.connect.helpers import jwt


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def test_jwt_exp_unverified() -> None:
    assert jwt_exp(jwt(1234567890)) == 1234567890.0
    assert jwt_exp(jwt(None)) is None
    for bad in ("opaque-token", "a.b", "x.!!!.y", "a.bnVsbA.c", "a.WzFd.c"):  # null, [1]
        assert jwt_exp(bad) is None


@pytest.mark.parametrize("raw", ["SECRETVAL\r\nX-Injected: 1", "SECRET VAL", "SECRETVAL\x00",
                                 "SECRETVAL\u00e9", ""])
def test_a_token_that_cannot_be_a_header_value_is_refused(raw: str) -> None:
    with pytest.raises(TokenSourceError) as e:
        check_token(raw, "source", time.time())
    assert "SECRET" not in str(e.value)


def test_file_rotation_is_seen_and_expiry_is_checked_on_every_call(tmp_path: Path) -> None:
    clock = Clock()
    f = tmp_path / "token"
    first, second = jwt(clock.now + 60, "a"), jwt(clock.now + 120, "b")
    f.write_text(first + "\n")
    src = FileToken(str(f), clock=clock)
    assert src.get() == first
    # rotation the kubelet way: a new file swapped in atomically
    tmp = tmp_path / "token.new"
    tmp.write_text(second)
    os.replace(tmp, f)
    assert src.get() == second
    # the file is not rotated any more: the cached token expires and is refused
    clock.now += 121
    with pytest.raises(TokenSourceError) as e:
        src.get()
    assert "expired" in str(e.value) and second not in str(e.value)


def test_file_with_an_expired_token(tmp_path: Path) -> None:
    f = tmp_path / "token"
    old = jwt(time.time() - 30)
    f.write_text(old)
    with pytest.raises(TokenSourceError) as e:
        FileToken(str(f)).get()
    assert "expired" in str(e.value) and str(f) in str(e.value) and old not in str(e.value)


def test_missing_empty_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(TokenSourceError, match="cannot read token file"):
        FileToken(str(tmp_path / "nope")).get()
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(TokenSourceError, match="is empty"):
        FileToken(str(tmp_path / "empty")).get()
    os.mkfifo(tmp_path / "fifo")  # would block a reader forever
    with pytest.raises(TokenSourceError, match="not a regular file"):
        FileToken(str(tmp_path / "fifo")).get()
    (tmp_path / "big").write_text("A" * (tokens.MAX_TOKEN_BYTES + 1000))
    with pytest.raises(TokenSourceError, match="more than a token"):
        FileToken(str(tmp_path / "big")).get()


def test_env_source() -> None:
    env = {"AGENT_TOKEN": " opaque-123 \n"}
    assert EnvToken("AGENT_TOKEN", environ=env).get() == "opaque-123"
    with pytest.raises(TokenSourceError, match="AGENT_TOKEN is not set"):
        EnvToken("AGENT_TOKEN", environ={}).get()


def _command(tmp_path: Path, body: str) -> str:
    """A token command: a Python script (its argv is split with shlex, no shell)."""
    script = tmp_path / "tokcmd.py"
    script.write_text(body)
    return f"{sys.executable} {script}"


def test_command_is_cached_until_shortly_before_exp(tmp_path: Path) -> None:
    counter = tmp_path / "n"
    cmd = _command(tmp_path, f"""
import base64, json, pathlib, sys, time
p = pathlib.Path({str(counter)!r})
n = int(p.read_text()) + 1 if p.exists() else 1
p.write_text(str(n))
exp = int(sys.argv[1]) if len(sys.argv) > 1 else 0
seg = lambda o: base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()
print(seg({{"alg": "RS256"}}) + "." + seg({{"sub": "run-%d" % n, "exp": exp}}) + ".c2ln")
""")
    clock = Clock()
    exp = int(clock.now) + 40  # a 40 s token: renewed 10 s (a quarter) before exp
    src = CommandToken(f"{cmd} {exp}", clock=clock)
    t1 = src.get()
    clock.now += 20
    assert src.get() == t1 and src.runs == 1  # cached
    clock.now = exp - 5                        # within the refresh margin: run again
    t2 = src.get()
    assert src.runs == 2 and t2 != t1 and counter.read_text() == "2"


def test_command_with_an_expired_token_is_refused_and_not_cached(tmp_path: Path) -> None:
    cmd = _command(tmp_path, """
import base64, json, time
seg = lambda o: base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()
print(seg({"alg": "RS256"}) + "." + seg({"exp": int(time.time()) - 5}) + ".c2ln")
""")
    src = CommandToken(cmd)
    for _ in range(2):
        with pytest.raises(TokenSourceError, match="expired"):
            src.get()
    assert src.runs == 2


def test_command_failure_is_clear_and_shows_no_token(tmp_path: Path) -> None:
    leaked = jwt(time.time() + 300)
    cmd = _command(tmp_path, f"""
import sys
print({leaked!r})
print("login required; cached token was {leaked}", file=sys.stderr)
sys.exit(3)
""")
    src = CommandToken(cmd)
    with pytest.raises(TokenSourceError) as e:
        src.get()
    msg = str(e.value)
    assert "exit status 3" in msg and "login required" in msg
    assert leaked not in msg and leaked.split(".")[1] not in msg
    # the next call runs the command again (a failure is never cached)
    with pytest.raises(TokenSourceError):
        src.get()
    assert src.runs == 2


def test_command_not_found_and_timeout(tmp_path: Path) -> None:
    with pytest.raises(TokenSourceError, match="cannot run token command"):
        CommandToken(str(tmp_path / "no-such-program")).get()
    slow = _command(tmp_path, "import time; time.sleep(30)")
    with pytest.raises(TokenSourceError, match="did not finish within 0.5 s"):
        CommandToken(slow, timeout=0.5).get()


def test_command_runs_without_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = CommandToken(f"{sys.executable} -c \"print('opaque-tok')\" ; touch {marker}")
    # with a shell this would print a token and create the marker; without one, python gets
    # the extra words as arguments and still prints the token
    assert src.get() == "opaque-tok"
    assert not marker.exists()


def test_command_description_names_the_program_only() -> None:
    src = CommandToken("/usr/bin/fetch-token --client-secret s3cr3t-value")
    assert "s3cr3t" not in src.describe and "fetch-token" in src.describe

"""A new user's audit store that DuckDB cannot open: truncated, not a DuckDB file at all,
or written by a newer DuckDB (a file copied from a newer install). The gateway refuses to
start and `agentgate audit …` fails — and both now say what to do (move the file aside
with its WAL, or open it with the DuckDB that wrote it) instead of only DuckDB's words
(the CLI used to suggest enabling the query socket, which does not help here)."""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path

import duckdb
import pytest

from addons.devkit.launch import BIN
from addons.recording import writer

CASES = ("truncated", "not duckdb", "newer duckdb")


def _checksum(block: bytes) -> int:
    # DuckDB's block checksum (common/checksum.cpp): 5381 XOR (each 8-byte word * a
    # constant), over the block after its 8-byte checksum field
    r = 5381
    for (x,) in struct.iter_unpack("<Q", block):
        r ^= (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return r


def bad_store(path: Path, case: str) -> None:
    good = path.with_suffix(".good")
    writer.open_db(good).close()
    data = bytearray(good.read_bytes())
    good.unlink()
    if case == "truncated":
        data = data[:5000]
    elif case == "not duckdb":
        data = bytearray(b"this is not a database\n")
    else:  # the main header's storage version number, far in the future, checksum kept
        assert data[8:12] == b"DUCK"
        data[12:20] = struct.pack("<Q", 999)
        struct.pack_into("<Q", data, 0, _checksum(bytes(data[8:4096])))
    path.write_bytes(bytes(data))


def _expect(text: str, db: Path, case: str) -> None:
    assert f"mv {db} {db}.old" in text, text
    assert "Traceback" not in text and "query socket" not in text, text
    if case == "newer duckdb":
        assert f"newer DuckDB than this one ({duckdb.__version__})" in text, text
    else:
        assert "damaged or not a DuckDB database" in text, text


@pytest.mark.parametrize("case", CASES)
def test_audit_commands_say_what_to_do(tmp_path: Path, case: str) -> None:
    db = tmp_path / "agentgate.duckdb"
    bad_store(db, case)
    for args in (["audit", "verify"], ["audit", "sessions"],
                 ["export", "--session", "x", "-o", str(tmp_path / "x.mitm")]):
        r = subprocess.run([str(BIN / "agentgate"), *args, "--db", str(db)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, (args, r.stdout)
        _expect(r.stdout + r.stderr, db, case)


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES)
def test_the_gateway_refuses_to_start_and_says_what_to_do(gateway_factory, no_identity,
                                                          tmp_path: Path, case: str) -> None:
    (tmp_path / "data0").mkdir()
    db = tmp_path / "data0" / "agentgate.duckdb"
    bad_store(db, case)
    gw = gateway_factory("{standin_upstreams}" + no_identity, wait=False)
    deadline = time.monotonic() + 60
    while gw.proc.poll() is None:
        assert time.monotonic() < deadline, gw.logs()[-3000:]
        time.sleep(0.2)
    assert gw.proc.returncode != 0
    logs = gw.logs()
    assert f"cannot open the audit store {db}" in logs, logs[-3000:]
    _expect(logs, db, case)

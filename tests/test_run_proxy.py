"""run_proxy.sh: interpreter discovery and its clear failure message."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import ROOT


def run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "pyenv"),
            "AGENTGATE_VENV": str(tmp_path / "venv")}
    base.update(env)
    return subprocess.run(["/bin/bash", str(ROOT / "run_proxy.sh"), *args], env=base,
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))


def test_no_suitable_python_is_a_clear_error(tmp_path: Path) -> None:
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    # a python3 that is too old: discovery must skip it and say what it looked for
    old = fakebin / "python3"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    import glob

    import pytest
    for cand in glob.glob("/usr/bin/python3*") + glob.glob("/bin/python3*"):
        ok = subprocess.run([cand, "-c", "import sys; sys.exit(sys.version_info < (3, 12))"],
                            capture_output=True).returncode == 0
        if ok:
            pytest.skip(f"{cand} is a suitable system Python on this machine")
    p = run_script(tmp_path, "cli", "rules", "check", PATH=f"{fakebin}:/usr/bin:/bin")
    assert p.returncode == 1
    assert "no Python >= 3.12 found" in p.stderr
    assert "pyenv" in p.stderr and "AGENTGATE_PYTHON" in p.stderr
    assert not (tmp_path / "venv").exists()


def test_agentgate_python_must_be_suitable(tmp_path: Path) -> None:
    p = run_script(tmp_path, "cli", "rules", "check", AGENTGATE_PYTHON="/bin/false")
    assert p.returncode == 1
    assert "is not a Python >= 3.12" in p.stderr


def test_pyenv_versions_are_found_and_existing_venv_reused(tmp_path: Path) -> None:
    """With the project's own venv already in sync, the script runs the CLI without pip."""
    venv = ROOT / ".venv"
    if not (venv / ".agentgate-deps-test").exists():
        import pytest
        pytest.skip("needs the venv made by ./run_proxy.sh test")
    p = run_script(tmp_path, "cli", "rules", "check", str(ROOT / "rules"),
                   AGENTGATE_VENV=str(venv), PATH=os.environ["PATH"])
    assert p.returncode == 0, p.stderr
    assert "rules OK" in p.stdout
    assert "installing dependencies" not in p.stderr


def test_bad_listen_address(tmp_path: Path) -> None:
    venv = ROOT / ".venv"
    if not (venv / ".agentgate-deps").exists():
        import pytest
        pytest.skip("needs the venv made by ./run_proxy.sh")
    p = run_script(tmp_path, AGENTGATE_VENV=str(venv), AGENTGATE_LISTEN="8080",
                   PATH=os.environ["PATH"])
    assert p.returncode == 1
    assert "AGENTGATE_LISTEN must be host:port" in p.stderr


def test_gateway_bytecode_is_cached_even_when_python_writes_none(tmp_path: Path) -> None:
    """Under PYTHONDONTWRITEBYTECODE (containers, CI machines) no import writes a .pyc:
    run_proxy.sh compiles addons/ itself, or every gateway and audit writer start would
    compile the whole package again (its CPU, and its RSS left behind)."""
    import importlib.util
    venv = ROOT / ".venv"
    if not (venv / ".agentgate-deps").exists():
        import pytest
        pytest.skip("needs the venv made by ./run_proxy.sh")
    src = ROOT / "addons" / "recording" / "writerproc.py"
    pyc = Path(importlib.util.cache_from_source(str(src)))
    pyc.unlink(missing_ok=True)
    p = run_script(tmp_path, "cli", "rules", "check", str(ROOT / "rules"),
                   AGENTGATE_VENV=str(venv), PATH=os.environ["PATH"],
                   PYTHONDONTWRITEBYTECODE="1")
    assert p.returncode == 0, p.stderr
    assert pyc.is_file(), "addons/ was not compiled"
    # fresh: the interpreter takes it instead of compiling (the source's mtime and size)
    head = pyc.read_bytes()[:16]
    st = src.stat()
    if int.from_bytes(head[4:8], "little") == 0:  # (else hash-based: checked by hash)
        assert int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
        assert int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF

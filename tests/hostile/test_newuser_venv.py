"""A second checkout started with the first one's virtualenv (`AGENTGATE_VENV=…/.venv`,
which run_proxy.sh offers to save a new install): the venv's `agentgate` is the first
checkout's editable install, so `./run_proxy.sh cli …` ran the other checkout's code, its
mitmdump loaded this checkout's gateway.py over the other's `addons`, and — once an extra
(demo, test) was missing from the venv's stamps — `pip install -e` re-pointed the shared
venv at the second checkout behind the first one's back. Refused now, naming both."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_another_checkouts_venv_is_refused_and_left_alone(tmp_path: Path) -> None:
    venv = ROOT / ".venv"
    if not (venv / ".agentgate-deps").exists():
        pytest.skip("needs the venv made by ./run_proxy.sh")
    other = tmp_path / "second-checkout"
    other.mkdir()
    for name in ("run_proxy.sh", "setup.cfg", "pyproject.toml"):
        shutil.copy2(ROOT / name, other / name)
    shutil.copytree(ROOT / "rules", other / "rules")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["AGENTGATE_VENV"] = str(venv)
    for args in (["cli", "rules", "check", "rules"], ["demo", "--help"]):
        p = subprocess.run(["/bin/bash", str(other / "run_proxy.sh"), *args], env=env,
                           capture_output=True, text=True, timeout=120, cwd=str(other))
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert f"the virtualenv {venv} runs the agentgate of {ROOT.resolve()}" in p.stderr
        assert str(other) in p.stderr and "installing dependencies" not in p.stderr
    # the shared venv still runs its own checkout's code
    got = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import addons; print(addons.__file__)"], env=env, cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert got.stdout.strip() == str(ROOT.resolve() / "addons" / "__init__.py")
    # its own checkout is not refused
    p = subprocess.run(["/bin/bash", str(ROOT / "run_proxy.sh"), "cli", "rules", "check",
                        str(ROOT / "rules")], env=env, capture_output=True, text=True,
                       timeout=120, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr

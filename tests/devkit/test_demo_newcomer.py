"""`agentgate demo` for a newcomer (issue 12 item 5): it shows the placeholder API key the
agent needs, leaves no /tmp/agentgate-demo-* behind, and prints commands that run from the
repository root even when `agentgate` is not on PATH."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from addons.devkit import demo
from tests.conftest import ROOT


def fake_result(tmp_path: Path, kept: bool) -> dict:
    db = str(tmp_path / "data" / "agentgate.duckdb")
    return {"agent": {"answer": "done", "transcript": []},
            "agent_env": {"HTTPS_PROXY": "http://agent:<token>@127.0.0.1:1",
                          "SSL_CERT_FILE": "/x/ca.pem",
                          "OPENAI_API_KEY": demo.PLACEHOLDER_KEY},
            "upstream_received": [], "recorded_in": db,
            "gateway_log": str(tmp_path / "gateway.log"), "leaked": [],
            "workdir": str(tmp_path), "kept": kept, "commands": demo._commands(db)}


def test_commands_use_run_proxy_when_agentgate_is_not_on_path(monkeypatch) -> None:
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    monkeypatch.chdir(ROOT)
    assert demo.cli_command() == "./run_proxy.sh cli"
    assert all(c.startswith("./run_proxy.sh cli audit ") for c in demo._commands("/d.duckdb"))
    monkeypatch.chdir("/")
    assert demo.cli_command() == f"{ROOT / 'run_proxy.sh'} cli"
    monkeypatch.setattr(demo.shutil, "which", lambda name: "/usr/local/bin/agentgate")
    assert demo.cli_command() == "agentgate"


def test_human_output_shows_placeholder_and_runnable_commands(tmp_path, monkeypatch,
                                                              capsys) -> None:
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    monkeypatch.chdir(ROOT)
    demo._print_human(fake_result(tmp_path, kept=True))
    out = capsys.readouterr().out
    assert f"OPENAI_API_KEY={demo.PLACEHOLDER_KEY}" in out
    assert "./run_proxy.sh cli audit sessions --db" in out
    assert " agentgate audit" not in out  # never a bare command that is not on PATH
    demo._print_human(fake_result(tmp_path, kept=False))
    out = capsys.readouterr().out
    assert "removed" in out and "--keep" in out
    assert "audit sessions" not in out  # no command pointing at a removed DuckDB


def test_workdir_removed_even_when_the_demo_fails(monkeypatch, tmp_path) -> None:
    made: list[Path] = []

    def boom(question: str, workdir: Path) -> dict:
        made.append(workdir)
        (workdir / "data").mkdir()
        raise RuntimeError("gateway did not start")

    monkeypatch.setattr(demo, "run_demo", boom)
    with pytest.raises(RuntimeError):
        demo.run_cli(argparse.Namespace(question="q", json=True, keep=False))
    assert made and not made[0].exists()


@pytest.mark.integration
def test_demo_json_placeholder_commands_and_no_leftover_dir() -> None:
    env = {k: v for k, v in os.environ.items()}
    env["PATH"] = "/usr/bin:/bin"  # agentgate is not on PATH (the venv's bin is not either)
    p = subprocess.run([sys.executable, "-m", "addons.cli", "demo", "--json"], env=env,
                       capture_output=True, text=True, timeout=240, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(p.stdout)
    assert result["agent"]["answer"] == "done: webhook answered 200"
    assert result["agent_env"]["OPENAI_API_KEY"] == demo.PLACEHOLDER_KEY
    assert Path(result["workdir"]).name.startswith("agentgate-demo-")
    assert result["kept"] is False and not Path(result["workdir"]).exists()
    assert result["commands"] and all(c.startswith("./run_proxy.sh cli audit ")
                                      for c in result["commands"])

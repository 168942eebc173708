"""A new user under `./run_proxy.sh dev` makes a call, then follows the README's audit
section: `agentgate audit sessions` from the repository reads `data/agentgate.duckdb`
(another run's store, or none) and shows nothing of the dev run, without saying why —
the dev store lives in the work directory. The dev banner now prints the audit commands
with this run's store; run exactly as printed, they show the call just made."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

import pytest

from tests.devkit.test_dev import CLIENT, Dev, dev_gateway  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


def test_the_printed_audit_commands_show_this_runs_calls(dev_gateway: Dev) -> None:  # noqa: F811
    d = dev_gateway
    printed = [ln.strip() for ln in d.out.splitlines()
               if " audit " in ln and "--db" in ln]
    assert len(printed) == 2, d.out
    db = d.workdir / "data" / "agentgate.duckdb"
    assert all(shlex.split(ln)[-1] == str(db) for ln in printed), printed
    t = d.token("--sub", "newcomer")
    assert t.returncode == 0, t.stderr
    r = subprocess.run([sys.executable, "-c", CLIENT, "hello, audit"],
                       env=d.agent_env(t.stdout.strip()),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    sessions = next(ln for ln in printed if "audit sessions" in ln)
    verify = next(ln for ln in printed if "audit verify" in ln)
    for _ in range(50):  # the writer commits in batches
        got = subprocess.run(shlex.split(sessions), env=d.env, capture_output=True, text=True,
                             timeout=60)
        assert got.returncode == 0, got.stderr
        if "newcomer" in got.stdout:
            break
        time.sleep(0.2)
    assert "newcomer" in got.stdout, got.stdout
    v = subprocess.run(shlex.split(verify), env=d.env, capture_output=True, text=True,
                       timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("OK: "), v.stdout + v.stderr

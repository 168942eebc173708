"""launch.start_gateway interrupted while it spawns mitmdump leaves no process behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.devkit.test_dev import _processes_mentioning

ROOT = Path(__file__).resolve().parents[2]


def test_ctrl_c_inside_popen_stops_the_gateway_it_spawned(tmp_path: Path) -> None:
    # the interrupt lands after the fork, before Popen returns (where Popen waits for the
    # exec): the real Popen runs, then SIGINT arrives while still inside the call
    script = textwrap.dedent(f"""\
        import os, signal, subprocess
        from pathlib import Path
        from addons.devkit import launch
        real = subprocess.Popen

        class Interrupted(real):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs at the next bytecode
                    pass

        launch.subprocess.Popen = Interrupted
        tmp = Path({str(tmp_path)!r})
        (tmp / "rules").mkdir()
        (tmp / "rules" / "r.yaml").write_text("identity:\\n  required: false\\n")
        try:
            launch.start_gateway(tmp / "rules", tmp / "conf", tmp / "data", tmp / "gw.log")
        except KeyboardInterrupt:
            print("interrupted")
        """)
    r = subprocess.run([sys.executable, "-c", script], cwd=str(ROOT), capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.strip() == "interrupted", r.stdout + r.stderr
    deadline = time.monotonic() + 5  # a survivor would stay: give a stopping one a moment
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(tmp_path)) == []

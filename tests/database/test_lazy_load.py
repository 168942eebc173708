"""The Postgres path is loaded when the rules declare a database, not with the gateway.

Most gateways have no `databases:`; the gateway's process then does not carry the wire
protocol, the relay, SQL facts and row masking (~2 MiB). Each case runs in a fresh
interpreter (sys.modules is per process) on this checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# what only the Postgres path needs
HEAVY = ["addons.database.config", "addons.database.session", "addons.database.protocol",
         "addons.database.sqlfacts", "addons.database.rowmask", "addons.database.depends",
         "addons.database.hooks", "addons.database.scram", "addons.database.policy"]

DB_RULES = """
databases:
  - name: warehouse
    listen: 127.0.0.1:15432
    upstream: 127.0.0.1:5432
    database: analytics
    credential: {user: agent_rw, password_env: WAREHOUSE_PASSWORD}
    server_tls: {mode: disable}
"""

PRELUDE = """
import json, logging, sys
from pathlib import Path
HEAVY = %r
BROKEN = %r

class Broken:
    # an install where the module cannot be imported
    def find_spec(self, name, path=None, target=None):
        if name in BROKEN:
            raise ImportError(f"{name} is broken here")
        return None

sys.meta_path.insert(0, Broken())

def loaded():
    return sorted(m for m in HEAVY if m in sys.modules)
"""


def run_child(body: str, broken: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-P", "-c", PRELUDE % (HEAVY, broken) + body],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gateway_with_the_default_rules_does_not_load_the_postgres_path() -> None:
    r = run_child("""
import addons.gateway as gw
from addons.config.loader import load_rules
rules = load_rules(Path("rules"))
from addons.database.addon import Databases
db = next(a for a in gw.addons if isinstance(a, Databases))
print(json.dumps({"loaded": loaded(), "databases": len(rules.databases),
                  "file": gw.__file__}))
""")
    assert r["file"].startswith(str(ROOT)), r  # this checkout
    assert r["databases"] == 0
    assert r["loaded"] == [], r


def test_rules_with_a_database_load_it_before_the_listener(tmp_path: Path) -> None:
    (tmp_path / "db.yaml").write_text(DB_RULES)
    r = run_child(f"""
from addons.config.loader import load_rules
from addons.config.holder import RulesHolder
from addons.database.addon import Databases
before = loaded()
rules = load_rules(Path({str(tmp_path)!r}))
after_rules = loaded()
db = Databases(RulesHolder(), approval=None, recorder=None)
ok = db._load()
print(json.dumps({{"before": before, "after_rules": after_rules, "after_load": loaded(),
                   "ok": ok, "keys": db.keys is not None,
                   "name": rules.databases[0].name}}))
""")
    assert r["before"] == []
    # the rules bring the whole path (off the event loop: a reload parses in a thread)
    assert r["after_rules"] == sorted(HEAVY), r
    assert r["ok"] and r["keys"] and r["name"] == "warehouse"
    assert r["after_load"] == sorted(HEAVY), r


@pytest.mark.parametrize("module", ["addons.database.config", "addons.database.session",
                                    "addons.database.sqlfacts", "addons.database.protocol"])
def test_a_database_section_whose_module_cannot_be_imported_is_a_rules_error(
        tmp_path: Path, module: str) -> None:
    (tmp_path / "db.yaml").write_text(DB_RULES)
    r = run_child(f"""
from addons.config.loader import load_rules
from addons.config.schema import ConfigError
try:
    load_rules(Path({str(tmp_path)!r}))
    print(json.dumps({{"error": None}}))
except ConfigError as e:
    print(json.dumps({{"error": str(e), "key": e.key}}))
""", broken=(module,))
    assert r["error"] is not None, "rules with a database loaded without its module"
    assert r["key"] == "databases"
    assert "cannot be imported" in r["error"]
    assert f"{module} is broken here" in r["error"]


@pytest.mark.parametrize("module", ["addons.database.session", "addons.database.hooks"])
def test_a_postgres_path_that_cannot_be_imported_opens_no_listener(module: str) -> None:
    r = run_child("""
import asyncio
from types import SimpleNamespace
from addons.config.holder import RulesHolder
from addons.database.addon import Databases
errors = []
class Catch(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            errors.append(record.getMessage())
logging.getLogger("agentgate").addHandler(Catch())
holder = RulesHolder()
db = SimpleNamespace(name="warehouse", listen_host="127.0.0.1", listen_port=1,
                     listen="127.0.0.1:1")
holder.rules = SimpleNamespace(databases=(db,))
d = Databases(holder, approval=None, recorder=None)
asyncio.run(d._sync())
print(json.dumps({"servers": len(d.servers), "errors": errors}))
""", broken=(module,))
    assert r["servers"] == 0
    assert any("Postgres path cannot be loaded" in e and module in e for e in r["errors"]), r

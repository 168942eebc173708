"""The package layout's rules (addons/README.md), checked over the real import graph.

Imports are read with `ast` (module level and inside functions; `if TYPE_CHECKING:` blocks
are left out because they never run), so this test sees every import the code can execute.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADDONS = ROOT / "addons"

# Data-path order of the concern packages: a concern may import a concern before it,
# never one after it. frame/ and the config leaves come first; devkit/ is outside.
ORDER = ["frame", "config.schema", "config.holder", "egress", "identity", "mcp", "policy",
         "masking", "approval", "recording", "database", "health"]
# modules that may know every concern: the rules loader, its addon and CLI, the entry points
TOP = {"addons.config.loader", "addons.config.addon", "addons.config.cli", "addons.gateway",
       "addons.cli"}
PURE = {"addons.masking.detectors", "addons.masking.fastscan", "addons.masking.normalize",
        "addons.masking.validators",
        "addons.masking.secret_rules", "addons.masking.masker", "addons.masking.bodies",
        "addons.masking.sse", "addons.policy.engine", "addons.identity.jwt",
        "addons.approval.store", "addons.approval.web.session", "addons.approval.web.render",
        "addons.recording.store", "addons.config.schema",
        "addons.config.loader", "addons.egress.config", "addons.egress.oauth",
        "addons.connect.tokens",
        "addons.mcp.jsonrpc", "addons.mcp.sse", "addons.mcp.pins", "addons.mcp.config",
        "addons.database.protocol", "addons.database.scram", "addons.database.sqlfacts",
        "addons.database.config", "addons.database.policy", "addons.database.session",
        "addons.approval.pgstore", "addons.health.probes"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def runtime_imports(path: Path) -> set[str]:
    """Every module this file can import at run time (absolute names)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.add(child.module)
                # `from addons.frame import guard` imports the submodule addons.frame.guard
                for a in child.names:
                    cand = f"{child.module}.{a.name}"
                    if (ADDONS.parent / (cand.replace(".", "/") + ".py")).exists():
                        out.add(cand)
            visit(child)

    visit(tree)
    return out


def graph() -> dict[str, set[str]]:
    g = {}
    for p in sorted(ADDONS.rglob("*.py")):
        g[module_name(p)] = {m for m in runtime_imports(p) if m.split(".")[0] == "addons"}
    return g


def rank(mod: str) -> int | None:
    rest = mod.removeprefix("addons.")
    for i, prefix in enumerate(ORDER):
        if rest == prefix or rest.startswith(prefix + "."):
            return i
    return None


def test_no_import_cycle() -> None:
    g = graph()
    # packages' __init__ modules are imported implicitly; they are docstrings only
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if n not in g:
                continue
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in g:
        if m not in state:
            dfs(m)


def test_imports_point_down_the_data_path() -> None:
    bad = []
    for mod, deps in graph().items():
        if mod in TOP or mod.startswith(("addons.devkit", "addons.connect")) or (
                ADDONS.parent / mod.replace(".", "/") / "__init__.py").exists():
            # entry points, the devkit, the agent-side connector (test_connect_is_agent_side),
            # package roots (docstrings only)
            continue
        r = rank(mod)
        assert r is not None, f"{mod} belongs to no package of the layout"
        for d in deps:
            if d in ("addons",) or rank(d) is None and d.count(".") <= 1:
                continue  # package roots (docstring only)
            if d.startswith("addons.devkit"):
                bad.append(f"{mod} imports the devkit ({d})")
            elif d == "addons.config.loader" and mod.endswith(".cli"):
                continue  # a concern's CLI loads the rules exactly as the gateway does
            elif d in TOP:
                bad.append(f"{mod} imports {d}, which knows every concern")
            elif rank(d) is None or rank(d) > r and not d.startswith(mod.rsplit(".", 1)[0] + "."):
                bad.append(f"{mod} imports {d}, a concern after it in the data path")
    assert not bad, "\n".join(bad)


def test_frame_and_schema_are_leaves() -> None:
    for mod, deps in graph().items():
        if mod.startswith("addons.frame") or mod in ("addons.config.schema",
                                                     "addons.config.holder"):
            ours = {d for d in deps if not d.startswith("addons.frame")}
            assert not ours, f"{mod} must import nothing of ours outside frame/: {ours}"


def test_connect_is_agent_side() -> None:
    """The connector runs next to the agent: it imports frame/ at most, nothing of the
    gateway's data path, and the gateway does not import it."""
    for mod, deps in graph().items():
        if mod.startswith("addons.connect"):
            ours = {d for d in deps if not d.startswith(("addons.frame", "addons.connect"))}
            assert not ours, f"{mod} must import nothing of the gateway: {ours}"
        elif mod != "addons.cli":
            assert not {d for d in deps if d.startswith("addons.connect")}, mod


def test_gateway_never_imports_devkit() -> None:
    g = graph()
    seen: set[str] = set()
    todo = ["addons.gateway"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(d for d in g.get(m, ()) if d in g)
    assert not {m for m in seen if m.startswith("addons.devkit")}


@pytest.mark.parametrize("mod", sorted(PURE))
def test_pure_logic_has_no_mitmproxy_import(mod: str) -> None:
    path = ROOT / (mod.replace(".", "/") + ".py")
    assert not {m for m in runtime_imports(path) if m.split(".")[0] == "mitmproxy"}


def test_every_module_imports_alone() -> None:
    """Each module imported first, in a fresh interpreter: an order-dependent import (a cycle
    that only works when something else was imported before) fails here."""
    mods = [m for m in graph() if not m.startswith("addons.devkit.agent")]
    code = ("import importlib, sys\nfail = []\n"
            "for m in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k == 'addons' or k.startswith('addons.')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        fail.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(fail)); sys.exit(1 if fail else 0)\n")
    p = subprocess.run([sys.executable, "-c", code, *mods], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_setup_cfg_installs_the_dependencies_and_every_package() -> None:
    """A section header misplaced inside [options] silently moves install_requires out of
    it: a fresh venv then gets no dependencies at all."""
    import configparser
    from fnmatch import fnmatchcase

    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    requires = cfg.get("options", "install_requires", fallback="")
    for dep in ("mitmproxy", "python-jose", "regex", "pyyaml", "duckdb"):
        assert dep in requires, f"[options] install_requires lacks {dep}"
    assert cfg.get("options", "python_requires", fallback="") == ">=3.12"
    include = [p.strip() for p in cfg.get("options.packages.find", "include").split(",")]
    assert cfg.get("options", "packages") == "find:"
    on_disk = {module_name(p.parent) for p in ADDONS.rglob("__init__.py")}
    missed = sorted(m for m in on_disk if not any(fnmatchcase(m, pat) for pat in include))
    assert not missed, f"packages not installed: {missed}"

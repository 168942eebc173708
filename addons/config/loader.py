"""Load and validate a rules directory into typed, immutable objects.

Every YAML file in the directory may hold any of the top-level sections below; list
sections are concatenated across files (in file-name order), mapping sections are merged
key by key and a key defined twice is an error. Every error names the file, the key path
and the reason, so a bad edit is easy to find. No mitmproxy import here: the CLI
(`agentgate rules check`) and the tests use the same code as the gateway.

The only module that knows every concern's section parser (each lives beside the logic it
configures):
  upstreams  -> addons.egress.config.parse_upstreams (list)
  identity   -> addons.identity.config.parse_identity
  masking    -> addons.masking.config.parse_masking
  policies   -> addons.policy.config.parse_policies (list)
  approvals  -> addons.approval.config.parse_approvals
  recorder   -> addons.recording.config.parse_recorder
  mcp        -> addons.mcp.config.parse_mcp
  databases  -> addons.database.config.parse_databases (list)
  audit_lake -> addons.recording.lake.parse_lake
  state      -> addons.approval.config.parse_state (a URL, or a mapping)

A concern whose section most rules never use (`databases`: the Postgres path — its config,
the relay, SQL facts, row masking, ~2 MiB of modules) is imported only when a rules file
gives that section items (in the reload's thread, off the event loop): the gateway's process
does not carry what its rules do not ask for. If that import fails, the section's error says
so, like any invalid key: the gateway does not start, a reload keeps the previous rules.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import yaml

from addons.approval.config import parse_approvals, parse_state
from addons.config.schema import ConfigError, MapSection, Where, expect_map
from addons.egress.config import Upstream, parse_upstreams
from addons.identity.config import parse_identity
from addons.masking.config import parse_masking
from addons.mcp.config import McpConfig, parse_mcp
from addons.policy.config import parse_policies
from addons.recording.config import parse_recorder
from addons.recording.lake import LakeConfig, parse_lake

if TYPE_CHECKING:
    from addons.database.config import Database


@dataclass(frozen=True)
class Rules:
    directory: str
    files: tuple[str, ...]
    upstreams: tuple[Upstream, ...]
    identity: Any
    masking: Any
    policies: Any
    approvals: Any
    recorder: Any
    mcp: Any = McpConfig()
    databases: tuple[Database, ...] = ()
    audit_lake: LakeConfig | None = None
    state: Any = None

    def upstream_for(self, host: str, port: int) -> Upstream | None:
        for up in self.upstreams:
            if up.matches(host, port):
                return up
        return None

    def upstream_named(self, name: str) -> Upstream | None:
        for up in self.upstreams:
            if up.name == name:
                return up
        return None


LIST_SECTIONS = ("upstreams", "policies", "databases")
MAP_SECTIONS = ("identity", "masking", "approvals", "recorder", "mcp", "audit_lake", "state")


def rule_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    return sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), "<file>", f"cannot read: {e}") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _no_duplicate_keys(loader, node, "", str(path))
            doc = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(str(path), "<yaml>", f"{pos}{problem}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(str(path), "<top>", "a rules file must be a mapping of sections")
    known = set(LIST_SECTIONS) | set(MAP_SECTIONS)
    for key in doc:
        if key not in known:
            raise ConfigError(str(path), str(key),
                              f"unknown section (allowed: {', '.join(sorted(known))})")
    return doc


def _no_duplicate_keys(loader: yaml.SafeLoader, node: yaml.Node, at: str, file: str,
                       seen_nodes: set[int] | None = None) -> None:
    """YAML keeps the last of two equal keys in a mapping and drops the first without a
    word: a second `policies:` in a file would silently discard every rule above it.
    Refused, naming both lines. (`<<` merge keys are YAML's own way to override.) Each
    node is looked at once: an alias names the same node again (and may name its own
    ancestor, or fan out a billion times)."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _no_duplicate_keys(loader, item, f"{at}[{i}]", file, seen_nodes)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":
                # what is merged may hold a key twice itself (`<<: {a: 1, a: 2}`): its
                # keys land in this mapping: checked, named under `<<`
                _no_duplicate_keys(loader, v, f"{at}.<<" if at else "<<", file, seen_nodes)
                continue
            name = loader.construct_object(k, deep=True) if isinstance(k, yaml.ScalarNode) \
                else None
            child = f"{at}.{name}" if at else str(name)
            if isinstance(k, yaml.ScalarNode):
                line = k.start_mark.line + 1
                try:
                    if name in seen:
                        raise ConfigError(file, child, f"line {line}: the key is already "
                                          f"given on line {seen[name]} of this mapping "
                                          "(YAML would silently keep only the last one)")
                    seen[name] = line
                except TypeError:  # an unhashable key: the section parsers refuse it
                    pass
            _no_duplicate_keys(loader, v, child, file, seen_nodes)


def _iter_list(lists: list[tuple[str, Any]], section: str) -> Iterator[tuple[Any, Where]]:
    for file, value in lists:
        where = Where(file, section)
        if value is None:
            continue
        if not isinstance(value, list):
            raise where.error(f"expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            yield item, where.child(i)


def concern_module(name: str, where: Where) -> ModuleType:
    """A concern's module, imported now because a rules section asks for it; any failure to
    import it is that section's error (fail closed: no start, or the old rules stay)."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - whatever breaks the import refuses the rules
        raise where.error(f"this section needs {name}, which cannot be imported "
                          f"({type(e).__name__}: {e})") from None


def _databases(lists: list[tuple[str, Any]]) -> tuple[Database, ...]:
    items = list(_iter_list(lists, "databases"))
    if not items:  # what parse_databases([]) gives, without importing the Postgres path
        return ()
    where = Where(items[0][1].file, "databases")
    config = concern_module("addons.database.config", where)
    # the relay too (the Databases addon opens listeners with it): a broken install is an
    # error of these rules, here, not a listener that fails to open later
    concern_module("addons.database.session", where)
    return config.parse_databases(items)


def load_rules(directory: str | Path) -> Rules:
    """Parse every YAML file of a rules directory. Raises ConfigError."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(str(d), "<dir>", "rules directory does not exist")
    files = rule_files(d)
    lists: dict[str, list[tuple[str, Any]]] = {s: [] for s in LIST_SECTIONS}
    maps: dict[str, dict[str, Any]] = {s: {} for s in MAP_SECTIONS}
    origins: dict[str, dict[str, str]] = {s: {} for s in MAP_SECTIONS}
    for path in files:
        doc = _load_yaml(path)
        for section, value in doc.items():
            if section in LIST_SECTIONS:
                lists[section].append((str(path), value))
                continue
            where = Where(str(path), section)
            if section == "state" and isinstance(value, str):
                value = {"url": value}  # `state: postgresql://…`
            for key, v in expect_map(value, where).items():
                if key in maps[section]:
                    raise where.child(key).error(
                        f"already set in {origins[section][key]}")
                maps[section][key] = v
                origins[section][key] = str(path)

    def section(name: str) -> MapSection:
        return MapSection(name, maps[name], origins[name])

    upstreams = parse_upstreams(list(_iter_list(lists["upstreams"], "upstreams")))
    return Rules(
        directory=str(d),
        files=tuple(str(p) for p in files),
        upstreams=upstreams,
        identity=parse_identity(section("identity")),
        masking=parse_masking(section("masking")),
        policies=parse_policies(list(_iter_list(lists["policies"], "policies")), upstreams),
        approvals=parse_approvals(section("approvals")),
        recorder=parse_recorder(section("recorder")),
        mcp=parse_mcp(section("mcp"), {u.name: u.dialect for u in upstreams}),
        databases=_databases(lists["databases"]),
        audit_lake=parse_lake(section("audit_lake")),
        state=parse_state(section("state")),
    )

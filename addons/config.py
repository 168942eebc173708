"""Load and validate a rules directory into typed, immutable objects.

Every YAML file in the directory may hold any of the top-level sections below; list
sections are concatenated across files (in file-name order), mapping sections are merged
key by key and a key defined twice is an error. Every error names the file, the key path
and the reason, so a bad edit is easy to find. No mitmproxy import here: the CLI
(`agentgate rules check`) and the tests use the same code as the gateway.

Section owners (each parser lives beside the logic it configures):
  upstreams  -> this module
  identity   -> addons.identity_config.parse_identity
  masking    -> addons.masking_config.parse_masking
  policies   -> addons.policy_config.parse_policies (list)
  approvals  -> addons.approvals_config.parse_approvals
  recorder   -> addons.recorder_config.parse_recorder
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DIALECTS = ("openai", "anthropic", "webhook", "generic")


class ConfigError(Exception):
    """A rules problem: which file, which key, and why."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        super().__init__(f"{file}: {key}: {reason}")


@dataclass(frozen=True)
class Where:
    """Position of a value inside the rules, for error messages."""

    file: str
    key: str

    def child(self, key: str | int) -> Where:
        if isinstance(key, int):
            return Where(self.file, f"{self.key}[{key}]")
        return Where(self.file, f"{self.key}.{key}" if self.key else key)

    def error(self, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key, reason)


# ---------------------------------------------------------------- typed helpers
def expect_map(value: Any, where: Where, allowed: set[str] | None = None,
               required: tuple[str, ...] = ()) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise where.error(f"keys must be strings, got {k!r}")
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise where.child(unknown[0]).error(
                f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for r in required:
        if r not in value:
            raise where.child(r).error("required key is missing")
    return value


def expect_str(value: Any, where: Where, *, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise where.error("must not be empty")
    return value


def expect_bool(value: Any, where: Where) -> bool:
    if not isinstance(value, bool):
        raise where.error(f"expected true or false, got {value!r}")
    return value


def expect_number(value: Any, where: Where, *, minimum: float | None = None,
                  maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(f"expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise where.error(f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise where.error(f"must be <= {maximum}, got {value}")
    return value


def expect_int(value: Any, where: Where, *, minimum: int | None = None,
               maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"expected a whole number, got {value!r}")
    expect_number(value, where, minimum=minimum, maximum=maximum)
    return value


def expect_str_list(value: Any, where: Where, *, allow_single: bool = True) -> tuple[str, ...]:
    """A list of strings; a single string is accepted as a one-element list."""
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise where.error(f"expected a list of strings, got {type(value).__name__}")
    return tuple(expect_str(v, where.child(i)) for i, v in enumerate(value))


def expect_regex(value: Any, where: Where, flags: int = 0) -> re.Pattern[str]:
    text = expect_str(value, where)
    try:
        return re.compile(text, flags)
    except re.error as e:
        raise where.error(f"invalid regular expression: {e}") from None


# ---------------------------------------------------------------- upstreams
def read_secret(env: str | None, file: str | None) -> str | None:
    """A secret from an environment variable or a file (re-read each call, so a rotated
    Kubernetes secret needs no restart); None when unset, empty or unreadable."""
    if env:
        return os.environ.get(env) or None
    if file:
        try:
            return Path(file).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class SecretRef:
    """Where the gateway finds an upstream's real credential. Never holds the value."""

    header: str
    env: str | None = None
    file: str | None = None
    prefix: str = ""

    def resolve(self) -> str | None:
        """The header value to inject, or None when the secret is not available."""
        raw = read_secret(self.env, self.file)
        if raw is None:
            return None
        return f"{self.prefix}{raw}"

    def describe(self) -> str:
        src = f"env {self.env}" if self.env else f"file {self.file}"
        return f"{self.header} from {src}"


@dataclass(frozen=True)
class Upstream:
    name: str
    hosts: tuple[str, ...]
    dialect: str
    credential: SecretRef | None
    forward_to: tuple[str, str, int] | None = None  # (scheme, host, port)
    allow_groups: tuple[str, ...] = ()
    allow_subjects: tuple[str, ...] = ()
    restore: bool = False
    mask: bool = True
    where: Where = field(default=Where("", ""), compare=False)

    def matches(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.hosts:
            if host_matches(pattern, host, port):
                return True
        return False


_HOST_RE = re.compile(
    r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$|^\[[0-9a-f:.]+\](:\d{1,5})?$")


def host_matches(pattern: str, host: str, port: int) -> bool:
    """`api.openai.com`, `*.example.com` (subdomains only) or `host:port` (exact port)."""
    p_host, p_port = pattern, None
    if pattern.startswith("["):
        end = pattern.index("]")
        p_host, rest = pattern[1:end], pattern[end + 1:]
        p_port = int(rest[1:]) if rest.startswith(":") else None
        host = host.strip("[]")
    elif pattern.count(":") == 1:
        p_host, port_s = pattern.split(":")
        p_port = int(port_s)
    if p_port is not None and p_port != port:
        return False
    if p_host.startswith("*."):
        suffix = p_host[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == p_host


def _parse_forward_to(value: Any, where: Where) -> tuple[str, str, int]:
    text = expect_str(value, where)
    m = re.fullmatch(r"(https?)://([A-Za-z0-9.-]+|\[[0-9a-fA-F:.]+\])(?::(\d{1,5}))?/?", text)
    if not m:
        raise where.error("expected scheme://host[:port], e.g. https://127.0.0.1:9443")
    scheme, host = m.group(1), m.group(2).strip("[]")
    port = int(m.group(3)) if m.group(3) else (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise where.error(f"port out of range: {port}")
    return scheme, host, port


UPSTREAM_KEYS = {"name", "hosts", "dialect", "credential", "forward_to", "allow_groups",
                 "allow_subjects", "restore", "mask"}
CREDENTIAL_KEYS = {"header", "env", "file", "prefix"}


def parse_upstream(raw: Any, where: Where) -> Upstream:
    d = expect_map(raw, where, UPSTREAM_KEYS, required=("name", "hosts"))
    name = expect_str(d["name"], where.child("name"))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise where.child("name").error("use letters, digits, '.', '_' or '-'")
    hosts = expect_str_list(d["hosts"], where.child("hosts"))
    if not hosts:
        raise where.child("hosts").error("at least one host is required")
    norm_hosts = []
    for i, h in enumerate(hosts):
        h = h.strip().lower()
        if not _HOST_RE.match(h):
            raise where.child("hosts").child(i).error(
                f"not a host name, '*.domain' or 'host:port': {h!r}")
        norm_hosts.append(h)
    dialect = d.get("dialect", "generic")
    if dialect not in DIALECTS:
        raise where.child("dialect").error(f"must be one of {', '.join(DIALECTS)}, got {dialect!r}")
    cred = None
    if d.get("credential") is not None:
        cw = where.child("credential")
        c = expect_map(d["credential"], cw, CREDENTIAL_KEYS, required=("header",))
        header = expect_str(c["header"], cw.child("header"))
        if not re.fullmatch(r"[A-Za-z0-9-]+", header):
            raise cw.child("header").error(f"not a valid header name: {header!r}")
        env = c.get("env")
        file = c.get("file")
        if (env is None) == (file is None):
            raise cw.error("give exactly one of 'env' (environment variable) or 'file' "
                           "(secret file); never the secret itself")
        if env is not None:
            env = expect_str(env, cw.child("env"))
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
                raise cw.child("env").error(f"not an environment variable name: {env!r}")
        if file is not None:
            file = expect_str(file, cw.child("file"))
        prefix = expect_str(c.get("prefix", ""), cw.child("prefix"), nonempty=False)
        cred = SecretRef(header=header.lower(), env=env, file=file, prefix=prefix)
    forward_to = None
    if d.get("forward_to") is not None:
        forward_to = _parse_forward_to(d["forward_to"], where.child("forward_to"))
    return Upstream(
        name=name,
        hosts=tuple(norm_hosts),
        dialect=dialect,
        credential=cred,
        forward_to=forward_to,
        allow_groups=expect_str_list(d.get("allow_groups", []), where.child("allow_groups")),
        allow_subjects=expect_str_list(d.get("allow_subjects", []), where.child("allow_subjects")),
        restore=expect_bool(d.get("restore", False), where.child("restore")),
        mask=expect_bool(d.get("mask", True), where.child("mask")),
        where=where,
    )


def parse_upstreams(items: list[tuple[Any, Where]]) -> tuple[Upstream, ...]:
    out: list[Upstream] = []
    seen: dict[str, Where] = {}
    for raw, where in items:
        up = parse_upstream(raw, where)
        if up.name in seen:
            raise where.child("name").error(
                f"upstream {up.name!r} is already defined at {seen[up.name].file}: "
                f"{seen[up.name].key}")
        seen[up.name] = where
        out.append(up)
    return tuple(out)


# ---------------------------------------------------------------- whole directory
@dataclass(frozen=True)
class MapSection:
    """A mapping section merged across files, remembering where each key came from."""

    name: str
    data: dict[str, Any]
    origins: dict[str, str]

    def where(self, key: str | None = None) -> Where:
        file = self.origins.get(key, "") if key else next(iter(self.origins.values()), "")
        return Where(file or "<defaults>", f"{self.name}.{key}" if key else self.name)


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


LIST_SECTIONS = ("upstreams", "policies")
MAP_SECTIONS = ("identity", "masking", "approvals", "recorder")


def rule_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    return sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), "<file>", f"cannot read: {e}") from None
    try:
        doc = yaml.safe_load(text)
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


def _iter_list(lists: list[tuple[str, Any]], section: str) -> Iterator[tuple[Any, Where]]:
    for file, value in lists:
        where = Where(file, section)
        if value is None:
            continue
        if not isinstance(value, list):
            raise where.error(f"expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            yield item, where.child(i)


def load_rules(directory: str | Path) -> Rules:
    """Parse every YAML file of a rules directory. Raises ConfigError."""
    # imported here so each concern's parser can import helpers from this module
    from addons.approvals_config import parse_approvals
    from addons.identity_config import parse_identity
    from addons.masking_config import parse_masking
    from addons.policy_config import parse_policies
    from addons.recorder_config import parse_recorder

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
    )


Parser = Callable[[MapSection], Any]

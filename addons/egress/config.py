"""The `upstreams` rules section: declared destinations, their dialect and where the gateway
finds each one's real credential (never the value itself). Pure; no mitmproxy import."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from addons.config.schema import (
    Where,
    expect_bool,
    expect_map,
    expect_str,
    expect_str_list,
    read_secret,
)

DIALECTS = ("openai", "anthropic", "webhook", "generic")


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

"""The `upstreams` rules section: declared destinations, their dialect and where the gateway
finds each one's real credential (never the value itself). Pure; no mitmproxy import."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from addons.config.schema import (
    Where,
    expect_bool,
    expect_map,
    expect_number,
    expect_str,
    expect_str_list,
    read_secret,
)
from addons.egress.oauth import TOKENS, OAuthClient
from addons.frame.hosts import is_loopback_host

DIALECTS = ("openai", "anthropic", "mcp", "webhook", "generic")
SCHEMES = ("https", "http")
DEFAULT_PORT = {"https": 443, "http": 80}


@dataclass(frozen=True)
class SecretRef:
    """Where the gateway finds an upstream's real credential. Never holds the value.

    A static secret (env or file), or an OAuth client-credentials token the gateway obtains
    (`oauth`; the credentials addon fetches it off the event loop, see addons/egress/oauth.py)."""

    header: str
    env: str | None = None
    file: str | None = None
    prefix: str = ""
    oauth: OAuthClient | None = None

    def resolve(self) -> str | None:
        """The header value to inject, or None when the secret is not available. Never
        blocks: an OAuth token is whatever the cache holds and is still valid."""
        raw = TOKENS.current(self.oauth) if self.oauth else read_secret(self.env, self.file)
        if raw is None:
            return None
        return f"{self.prefix}{raw}"

    def describe(self) -> str:
        if self.oauth is not None:
            return f"{self.header} from {self.oauth.describe()}"
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
    # How agents reach it: "https" (default; a host without a port is 443 only) or "http"
    # (declared explicitly; a host without a port is 80 only).
    scheme: str = "https"
    # Names that resolve to loopback/private/link-local/... addresses are refused unless set.
    allow_private: bool = False
    websocket: bool = False  # WebSocket upgrades refused unless the upstream opts in
    paths: tuple[str, ...] | None = None  # globs allowed on top of the dialect's endpoints
    where: Where = field(default=Where("", ""), compare=False)

    def matches(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.hosts:
            if host_matches(pattern, host, port, DEFAULT_PORT[self.scheme]):
                return True
        return False

    def literal_addresses(self) -> set[tuple[str, int | None]]:
        """IP addresses the rules name explicitly (hosts entries and forward_to).

        Naming an address is declaring it: those may be private/loopback without
        `allow_private` (a *name* that resolves there is what the flag guards)."""
        out: set[tuple[str, int | None]] = set()
        for pattern in self.hosts:
            host, port = split_pattern(pattern)
            if is_ip(host):
                out.add((str(ipaddress.ip_address(host)), port or DEFAULT_PORT[self.scheme]))
        if self.forward_to is not None and is_ip(self.forward_to[1]):
            out.add((str(ipaddress.ip_address(self.forward_to[1])), self.forward_to[2]))
        return out


_HOST_RE = re.compile(
    r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$|^\[[0-9a-f:.]+\](:\d{1,5})?$")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def split_pattern(pattern: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` -> (host, port or None)."""
    if pattern.startswith("["):
        end = pattern.index("]")
        rest = pattern[end + 1:]
        return pattern[1:end], (int(rest[1:]) if rest.startswith(":") else None)
    if pattern.count(":") == 1:
        p_host, port_s = pattern.split(":")
        return p_host, int(port_s)
    return pattern, None


def host_matches(pattern: str, host: str, port: int, default_port: int = 443) -> bool:
    """`api.openai.com`, `*.example.com` (subdomains only) or `host:port` (exact port).

    A pattern without a port matches only the upstream scheme's default port (443 for
    https): declaring `api.openai.com` does not open `api.openai.com:22`."""
    p_host, p_port = split_pattern(pattern)
    host = host.strip("[]")
    if (p_port if p_port is not None else default_port) != port:
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
                 "allow_subjects", "restore", "mask", "scheme", "allow_private", "websocket",
                 "paths"}
CREDENTIAL_KEYS = {"header", "env", "file", "prefix", "oauth"}
OAUTH_KEYS = {"token_url", "client_id", "client_secret_env", "client_secret_file", "scope",
              "audience", "resource", "auth_method", "ca_file", "timeout", "refresh_margin"}


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
        cred = _parse_credential(d["credential"], cw)
    forward_to = None
    if d.get("forward_to") is not None:
        forward_to = _parse_forward_to(d["forward_to"], where.child("forward_to"))
    scheme = expect_str(d.get("scheme", "https"), where.child("scheme"))
    if scheme not in SCHEMES:
        raise where.child("scheme").error(f"must be https or http, got {scheme!r}")
    if cred is not None:
        _no_cleartext_credential(scheme, norm_hosts, forward_to, where)
    websocket = expect_bool(d.get("websocket", False), where.child("websocket"))
    mask = expect_bool(d.get("mask", True), where.child("mask"))
    paths = None
    if d.get("paths") is not None:
        paths = expect_str_list(d["paths"], where.child("paths"))
        for i, p in enumerate(paths):
            if not p.startswith("/"):
                raise where.child("paths").child(i).error(f"a path glob starts with '/': {p!r}")
    return Upstream(
        name=name,
        hosts=tuple(norm_hosts),
        dialect=dialect,
        credential=cred,
        forward_to=forward_to,
        allow_groups=expect_str_list(d.get("allow_groups", []), where.child("allow_groups")),
        allow_subjects=expect_str_list(d.get("allow_subjects", []), where.child("allow_subjects")),
        restore=expect_bool(d.get("restore", False), where.child("restore")),
        mask=mask,
        scheme=scheme,
        allow_private=expect_bool(d.get("allow_private", False), where.child("allow_private")),
        websocket=websocket,
        paths=paths,
        where=where,
    )



def _parse_credential(raw: Any, cw: Where) -> SecretRef:
    c = expect_map(raw, cw, CREDENTIAL_KEYS)
    oauth = None
    if c.get("oauth") is not None:
        if c.get("env") is not None or c.get("file") is not None:
            raise cw.error("give either 'oauth' (a token the gateway obtains) or 'env'/'file' "
                           "(a static secret), not both")
        oauth = _parse_oauth(c["oauth"], cw.child("oauth"))
    elif "header" not in c:
        raise cw.child("header").error("required key is missing")
    header = expect_str(c.get("header", "authorization"), cw.child("header"))
    if not re.fullmatch(r"[A-Za-z0-9-]+", header):
        raise cw.child("header").error(f"not a valid header name: {header!r}")
    env = c.get("env")
    file = c.get("file")
    if oauth is None and (env is None) == (file is None):
        raise cw.error("give exactly one of 'env' (environment variable) or 'file' "
                       "(secret file); never the secret itself")
    if env is not None:
        env = _env_name(env, cw.child("env"))
    if file is not None:
        file = expect_str(file, cw.child("file"))
    default_prefix = "Bearer " if oauth is not None and header.lower() == "authorization" else ""
    prefix = expect_str(c.get("prefix", default_prefix), cw.child("prefix"), nonempty=False)
    return SecretRef(header=header.lower(), env=env, file=file, prefix=prefix, oauth=oauth)


def _env_name(value: Any, where: Where) -> str:
    env = expect_str(value, where)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
        raise where.error(f"not an environment variable name: {env!r}")
    return env


def _parse_oauth(raw: Any, ow: Where) -> OAuthClient:
    o = expect_map(raw, ow, OAUTH_KEYS, required=("token_url", "client_id"))
    token_url = expect_str(o["token_url"], ow.child("token_url"))
    m = re.fullmatch(r"(https?)://([A-Za-z0-9.-]+|\[[0-9a-fA-F:.]+\])(?::\d{1,5})?(/[^\s#]*)?",
                     token_url)
    if not m:
        raise ow.child("token_url").error("expected https://host[:port]/path")
    if m.group(1) == "http" and not is_loopback_host(m.group(2).strip("[]")):
        raise ow.child("token_url").error(
            "the client secret is never sent in clear text: use https:// (or a loopback "
            "http:// address)")
    secret_env, secret_file = o.get("client_secret_env"), o.get("client_secret_file")
    if (secret_env is None) == (secret_file is None):
        raise ow.error("give exactly one of 'client_secret_env' (environment variable) or "
                       "'client_secret_file' (secret file); never the secret itself")
    if secret_env is not None:
        secret_env = _env_name(secret_env, ow.child("client_secret_env"))
    if secret_file is not None:
        secret_file = expect_str(secret_file, ow.child("client_secret_file"))
    auth_method = expect_str(o.get("auth_method", "basic"), ow.child("auth_method"))
    if auth_method not in ("basic", "post"):
        raise ow.child("auth_method").error(
            f"must be basic (client_secret_basic) or post (client_secret_post), "
            f"got {auth_method!r}")
    opt = {k: expect_str(o[k], ow.child(k)) for k in ("scope", "audience", "resource", "ca_file")
           if o.get(k) is not None}
    return OAuthClient(
        token_url=token_url, client_id=expect_str(o["client_id"], ow.child("client_id")),
        secret_env=secret_env, secret_file=secret_file, auth_method=auth_method,
        timeout=float(expect_number(o.get("timeout", 10), ow.child("timeout"), minimum=0.5,
                                    maximum=60)),
        refresh_margin=float(expect_number(o.get("refresh_margin", 60),
                                           ow.child("refresh_margin"), minimum=0,
                                           maximum=3600)),
        **opt)


def _no_cleartext_credential(scheme: str, hosts: list[str],
                             forward_to: tuple[str, str, int] | None, where: Where) -> None:
    """A real credential travels in clear text only to a declared http:// loopback server."""
    if forward_to is not None:
        if forward_to[0] == "http" and not is_loopback_host(forward_to[1]):
            raise where.child("forward_to").error(
                "a credential is never sent in clear text: use https:// (or a loopback "
                "http:// address)")
        return
    if scheme == "http" and not all(is_loopback_host(split_pattern(h)[0]) for h in hosts):
        raise where.child("scheme").error(
            "a credential is never sent in clear text: an http upstream with a credential "
            "must be a loopback address")


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

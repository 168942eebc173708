"""Parse the `approvals` section of the rules: reviewers' API, notifications, defaults.

```yaml
approvals:
  listen: 127.0.0.1:8081          # reviewers' HTTP API ("off": no API)
  link_base: https://gw.internal:8081
  default_timeout: 300            # seconds, for decisions that carry none
  on_timeout: deny                # deny | allow, for decisions that carry none
  timeout_status: 403             # 403 or 408 on timeout
  allow_mitmweb: true             # master switch: false = no rule's allow_mitmweb applies
  max_pending: 1000
  max_pending_per_identity: 20    # one agent cannot fill the queue for everyone
  preview_bytes: 262144           # the masked request kept for reviewers (256 KiB)
  retry_grace: 15                 # a hold whose client went away waits this long for its retry
  notify:
    format: slack                 # slack (Block Kit, buttons) | json (approval.* events)
    url_env: SLACK_WEBHOOK_URL    # or url: / url_file:
    retries: 5
    backoff: 1
    max_backoff: 60
    timeout: 5
    ca_file: /etc/ssl/internal-ca.pem
  web:                            # the reviewers' page: OIDC login (code + PKCE)
    client_id: agentgate-reviewers
    client_secret_env: AGENTGATE_WEB_CLIENT_SECRET   # or client_secret_file:; none: public
    issuer: https://idp.example   # one of identity.issuers (default: the first)
    redirect_url: https://gw.internal:8081/ui/callback
    cookie_secret_file: /run/secrets/agentgate-cookie  # or cookie_secret_env:
    session_minutes: 480
```
No mitmproxy import: `agentgate rules check` uses the same parser.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addons.approval.slack import SlackConfig, parse_slack
from addons.config.schema import (
    MapSection,
    Where,
    expect_bool,
    expect_int,
    expect_map,
    expect_number,
    expect_str,
    expect_str_list,
    read_secret,
)

APPROVALS_KEYS = {"listen", "link_base", "default_timeout", "on_timeout", "timeout_status",
                  "allow_mitmweb", "max_pending", "max_pending_per_identity", "preview_chars",
                  "preview_bytes", "notify", "web", "slack", "retry_grace"}
NOTIFY_KEYS = {"url", "url_env", "url_file", "retries", "backoff", "max_backoff", "timeout",
               "ca_file", "format"}
DEFAULT_PREVIEW_BYTES = 256 * 1024
WEB_KEYS = {"client_id", "client_secret_env", "client_secret_file", "issuer", "redirect_url",
            "cookie_secret_env", "cookie_secret_file", "session_minutes", "scopes"}
MIN_COOKIE_SECRET = 32  # bytes: the session cookie's HMAC key
DEFAULT_LISTEN = "127.0.0.1:8081"
LISTEN_ENV = "AGENTGATE_APPROVALS_LISTEN"  # overrides `listen`; --set overrides it
MAX_TIMEOUT = 7 * 24 * 3600

_LISTEN_RE = re.compile(r"^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$")
_URL_RE = re.compile(r"^https?://[^\s/?#]+(?:/[^\s]*)?$")


def parse_listen(text: str) -> tuple[str, int] | None:
    """`host:port` / `[v6]:port` -> (host, port); "off" / "" -> None. Raises ValueError."""
    text = text.strip()
    if text.lower() in ("", "off", "none", "false"):
        return None
    m = _LISTEN_RE.match(text)
    if not m:
        raise ValueError(f"expected host:port (e.g. {DEFAULT_LISTEN}) or off, got {text!r}")
    port = int(m.group(3))
    if port > 65535:
        raise ValueError(f"port out of range: {port}")
    return (m.group(1) or m.group(2)), port


def listen_text(listen: tuple[str, int]) -> str:
    """`host:port` as it would be written in the rules or the env var (`[v6]:port`)."""
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_reason(err: OSError) -> str:
    """Why a listener could not bind, in words (asyncio's own message names the errno)."""
    if err.errno == errno.EADDRINUSE:
        return "the address is already in use (another gateway or program listens there)"
    if err.errno == errno.EADDRNOTAVAIL:
        return "that address does not belong to this machine"
    if err.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return err.strerror or type(err).__name__


def url_for(listen: tuple[str, int] | None) -> str:
    if listen is None:
        return ""
    host, port = listen
    if ":" in host:
        host = f"[{host}]"
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


@dataclass(frozen=True)
class NotifyConfig:
    """Where new holds are announced. Holds the URL's *source*, not the URL itself when it
    comes from the environment or a file (a Slack webhook URL is a secret)."""

    url: str | None = None
    url_env: str | None = None
    url_file: str | None = None
    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 5.0
    ca_file: str | None = None
    format: str = "slack"

    def resolve(self) -> str | None:
        if self.url:
            return self.url
        return read_secret(self.url_env, self.url_file)

    def describe(self) -> str:
        if self.url_env:
            src = f"${self.url_env}"
        elif self.url_file:
            src = f"file {self.url_file}"
        else:
            src = _host_of(self.url or "")
        return f"webhook {src} ({self.retries} retries)"


def _host_of(url: str) -> str:
    m = re.match(r"^(https?://[^/?#]+)", url)
    return m.group(1) if m else "?"


@dataclass(frozen=True)
class WebConfig:
    """The reviewers' page login (OIDC authorization code + PKCE). Secrets are held by
    *source* (environment variable or file), read when needed, never stored here."""

    client_id: str
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    issuer: str | None = None          # None: the first of identity.issuers
    redirect_url: str | None = None    # None: <link_base or listen>/ui/callback
    cookie_secret_env: str | None = None
    cookie_secret_file: str | None = None  # neither: a random key per gateway start
    session_minutes: int = 480
    scopes: tuple[str, ...] = ("openid", "profile", "email")

    def client_secret(self) -> str | None:
        return read_secret(self.client_secret_env, self.client_secret_file)

    def cookie_secret(self) -> str | None:
        return read_secret(self.cookie_secret_env, self.cookie_secret_file)


@dataclass(frozen=True)
class ApprovalsConfig:
    listen: tuple[str, int] | None = ("127.0.0.1", 8081)
    link_base: str = ""
    default_timeout: float = 300.0
    on_timeout: str = "deny"
    timeout_status: int = 403
    allow_mitmweb: bool = True
    max_pending: int = 1000
    max_pending_per_identity: int = 20
    preview_chars: int = 2000  # legacy: read as preview_bytes when that is not given
    notify: NotifyConfig | None = None
    preview_bytes: int = DEFAULT_PREVIEW_BYTES
    slack: SlackConfig | None = None
    # seconds a hold whose clients all went away waits for a retry to join it
    retry_grace: float = 15.0
    web: WebConfig | None = None

    def link(self, approval_id: str, listen: tuple[str, int] | None = None) -> str:
        base = (self.link_base or url_for(listen or self.listen)).rstrip("/")
        return f"{base}/approvals/{approval_id}" if base else ""

    def describe(self) -> str:
        api = url_for(self.listen) or "off"
        notify = self.notify.describe() if self.notify else "no notifications"
        page = (f"page sign-in as OIDC client {self.web.client_id}" if self.web
                else "page sign-in off (no approvals.web)")
        return (f"API {api}, {page}, default timeout {self.default_timeout:g}s "
                f"(on timeout {self.on_timeout}, {self.timeout_status}), "
                f"mitmweb approval {'per rule' if self.allow_mitmweb else 'off'}, {notify}")


def _parse_notify(raw: Any, where: Where) -> NotifyConfig:
    d = expect_map(raw, where, NOTIFY_KEYS)
    sources = [k for k in ("url", "url_env", "url_file") if d.get(k) is not None]
    if len(sources) != 1:
        raise where.error("give exactly one of 'url', 'url_env' (environment variable) or "
                          "'url_file' (secret file)")
    url = url_env = url_file = None
    if "url" in sources:
        url = expect_str(d["url"], where.child("url")).strip()
        if not _URL_RE.match(url):
            raise where.child("url").error("expected an http:// or https:// URL")
    if "url_env" in sources:
        url_env = expect_str(d["url_env"], where.child("url_env"))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", url_env):
            raise where.child("url_env").error(f"not an environment variable name: {url_env!r}")
    if "url_file" in sources:
        url_file = expect_str(d["url_file"], where.child("url_file"))
    ca_file = None
    if d.get("ca_file") is not None:
        ca_file = expect_str(d["ca_file"], where.child("ca_file"))
        if not Path(ca_file).is_file():
            raise where.child("ca_file").error(f"no such file: {ca_file}")
    backoff = float(expect_number(d.get("backoff", 1.0), where.child("backoff"),
                                  minimum=0.01, maximum=3600))
    max_backoff = float(expect_number(d.get("max_backoff", 60.0), where.child("max_backoff"),
                                      minimum=0.01, maximum=86400))
    if max_backoff < backoff:
        raise where.child("max_backoff").error("must be >= backoff")
    return NotifyConfig(
        url=url, url_env=url_env, url_file=url_file,
        retries=expect_int(d.get("retries", 5), where.child("retries"), minimum=0,
                           maximum=1000),
        backoff=backoff, max_backoff=max_backoff,
        timeout=float(expect_number(d.get("timeout", 5.0), where.child("timeout"),
                                    minimum=0.1, maximum=300)),
        ca_file=ca_file,
        format=_notify_format(d.get("format", "slack"), where.child("format")),
    )


def _notify_format(value: Any, where: Where) -> str:
    if value not in ("slack", "json"):
        raise where.error(f"must be slack or json, got {value!r}")
    return str(value)


def _env_name(value: Any, where: Where) -> str:
    name = expect_str(value, where)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise where.error(f"not an environment variable name: {name!r}")
    return name


def _parse_web(raw: Any, where: Where) -> WebConfig:
    d = expect_map(raw, where, WEB_KEYS)
    if d.get("client_id") is None:
        raise where.error("needs 'client_id' (the reviewers' page's OIDC client)")
    client_id = expect_str(d["client_id"], where.child("client_id")).strip()
    secret: dict[str, str | None] = {}
    for what in ("client_secret", "cookie_secret"):
        given = [k for k in (f"{what}_env", f"{what}_file") if d.get(k) is not None]
        if len(given) > 1:
            raise where.error(f"give at most one of '{what}_env' and '{what}_file'")
        secret[f"{what}_env"] = (_env_name(d[f"{what}_env"], where.child(f"{what}_env"))
                                 if d.get(f"{what}_env") is not None else None)
        secret[f"{what}_file"] = (expect_str(d[f"{what}_file"], where.child(f"{what}_file"))
                                  if d.get(f"{what}_file") is not None else None)
    issuer = None
    if d.get("issuer") is not None:
        issuer = expect_str(d["issuer"], where.child("issuer")).strip().rstrip("/")
        if not _URL_RE.match(issuer):
            raise where.child("issuer").error("expected an http:// or https:// URL")
    redirect_url = None
    if d.get("redirect_url") is not None:
        redirect_url = expect_str(d["redirect_url"], where.child("redirect_url")).strip()
        if not _URL_RE.match(redirect_url):
            raise where.child("redirect_url").error("expected an http:// or https:// URL")
    scopes = ("openid", "profile", "email")
    if d.get("scopes") is not None:
        scopes = expect_str_list(d["scopes"], where.child("scopes"))
        if "openid" not in scopes:
            raise where.child("scopes").error("must include 'openid' (the login needs an "
                                              "ID token)")
        if not all(re.fullmatch(r"[\x21\x23-\x5b\x5d-\x7e]+", s) for s in scopes):
            raise where.child("scopes").error("a scope is one word of printable ASCII")
    return WebConfig(
        client_id=client_id, issuer=issuer, redirect_url=redirect_url, scopes=scopes,
        session_minutes=expect_int(d.get("session_minutes", 480), where.child("session_minutes"),
                                   minimum=1, maximum=7 * 24 * 60),
        **secret)


def parse_approvals(section: MapSection) -> ApprovalsConfig:
    d = expect_map(section.data, section.where(), APPROVALS_KEYS)
    w = section.where
    listen: tuple[str, int] | None = ("127.0.0.1", 8081)
    if "listen" in d:
        value = d["listen"]
        if value is False or value is None:
            listen = None
        else:
            try:
                listen = parse_listen(expect_str(value, w("listen")))
            except ValueError as e:
                raise w("listen").error(str(e)) from None
    link_base = ""
    if d.get("link_base") is not None:
        link_base = expect_str(d["link_base"], w("link_base")).strip().rstrip("/")
        if not _URL_RE.match(link_base):
            raise w("link_base").error("expected an http:// or https:// URL")
    on_timeout = d.get("on_timeout", "deny")
    if on_timeout not in ("deny", "allow"):
        raise w("on_timeout").error(f"must be deny or allow, got {on_timeout!r}")
    timeout_status = expect_int(d.get("timeout_status", 403), w("timeout_status"))
    if timeout_status not in (403, 408):
        raise w("timeout_status").error(
            f"must be 403 or 408, got {timeout_status} (SDKs retry a 408 on their own)")
    notify = _parse_notify(d["notify"], w("notify")) if d.get("notify") is not None else None
    return ApprovalsConfig(
        listen=listen,
        link_base=link_base,
        default_timeout=float(expect_number(d.get("default_timeout", 300),
                                            w("default_timeout"), minimum=0.01,
                                            maximum=MAX_TIMEOUT)),
        on_timeout=on_timeout,
        timeout_status=timeout_status,
        allow_mitmweb=expect_bool(d.get("allow_mitmweb", True), w("allow_mitmweb")),
        max_pending=expect_int(d.get("max_pending", 1000), w("max_pending"), minimum=1,
                               maximum=1_000_000),
        max_pending_per_identity=expect_int(d.get("max_pending_per_identity", 20),
                                            w("max_pending_per_identity"), minimum=1,
                                            maximum=1_000_000),
        preview_chars=expect_int(d.get("preview_chars", 2000), w("preview_chars"),
                                 minimum=0, maximum=1_000_000),
        notify=notify,
        web=_parse_web(d["web"], w("web")) if d.get("web") is not None else None,
        preview_bytes=expect_int(d.get("preview_bytes", d.get("preview_chars",
                                                              DEFAULT_PREVIEW_BYTES)),
                                 w("preview_bytes" if "preview_bytes" in d else "preview_chars"),
                                 minimum=0, maximum=16 * 1024 * 1024),
        slack=parse_slack(d["slack"], w("slack")) if d.get("slack") is not None else None,
        retry_grace=float(expect_number(d.get("retry_grace", 15), w("retry_grace"),
                                        minimum=0, maximum=3600)),
    )


# ---------------------------------------------------------------- state: (several replicas)
STATE_KEYS = {"url", "url_env"}


@dataclass(frozen=True)
class StateConfig:
    """Where replicas share their holds: `state: postgresql://…` (or `{url: …}`), or
    `state: {url_env: NAME}` to keep a password out of the rules. `$AGENTGATE_STATE`, when
    set, wins (pgstore.py). Read when the gateway starts."""

    url: str = ""
    url_env: str = ""

    def resolve(self) -> str:
        if self.url:
            return self.url
        return os.environ.get(self.url_env, "").strip() if self.url_env else ""


def parse_state(section: MapSection) -> StateConfig | None:
    if not section.data:
        return None
    d = expect_map(section.data, section.where(), STATE_KEYS)
    w = section.where
    if ("url" in d) == ("url_env" in d):
        raise section.where().error("set one of url (a postgresql:// URL) or url_env (the "
                                    "name of an environment variable holding it)")
    if "url_env" in d:
        name = expect_str(d["url_env"], w("url_env")).strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise w("url_env").error("expected an environment variable name")
        return StateConfig(url_env=name)
    url = expect_str(d["url"], w("url")).strip()
    from addons.approval.pgstore import check_dsn  # psycopg: only when the key is used
    try:
        check_dsn(url)
    except ValueError as e:
        raise w("url").error(str(e)) from None  # the message never echoes the URL
    return StateConfig(url=url)

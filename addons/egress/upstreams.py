"""Resolve which declared upstream a request goes to; refuse everything else.

Default-deny egress: a host:port that no upstream declares gets a 403 at CONNECT time (no TLS
handshake, no upstream connection) or on the request for plain HTTP. On every request the
destination is pinned: the Host header, the HTTP/2 `:authority`, an absolute-form URL and the
TLS SNI must all name the tunnel's target (421 otherwise: domain fronting), the scheme must
be the upstream's (no cleartext to an https upstream, so no credential in clear text), a
WebSocket or other protocol upgrade needs the upstream's opt-in, and the path must be one of
the dialect's endpoints (or the upstream's `paths:`).
"""

from __future__ import annotations

import functools

from mitmproxy import http
from mitmproxy.net.http import url

from addons.config.holder import RulesHolder
from addons.egress.config import Upstream
from addons.egress.paths import PathError, normalise, path_allowed
from addons.frame.guard import guarded, refuse

STEP = "upstreams"


def _norm_host(host: str) -> str:
    return host.strip().strip("[]").lower().rstrip(".")


@functools.lru_cache(maxsize=1024)
def _authority(value: str) -> tuple[str, int | None] | None:
    """mitmproxy's strict `parse_authority` (IDNA checks: ~10 µs), remembered for the few
    Host values a gateway sees (every request on a connection repeats its own); None for a
    malformed one. Only short values are passed here, so the cache stays small."""
    try:
        return url.parse_authority(value, check=True)
    except ValueError:
        return None


def parse_host(value: str) -> tuple[str, int | None] | None:
    return _authority(value) if len(value) <= 300 else _authority.__wrapped__(value)


def _named(headers: http.Headers) -> tuple[list[str], str | None, str]:
    """`headers.get_all("host")`, `headers.get("upgrade")` and `headers.get("connection",
    "")` (values decoded and folded as mitmproxy does) from one pass over the fields:
    mitmproxy's `get`/`get_all` each lower-case every field name again (3 passes)."""
    host: list[str] = []
    upgrade: list[bytes] = []
    conn: list[bytes] = []
    for k, v in headers.fields:
        k = k.lower()
        if k == b"host":
            host.append(v.decode("utf-8", "surrogateescape"))
        elif k == b"upgrade":
            upgrade.append(v)
        elif k == b"connection":
            conn.append(v)
    return (host,
            b", ".join(upgrade).decode("utf-8", "surrogateescape") if upgrade else None,
            b", ".join(conn).decode("utf-8", "surrogateescape"))


PATH_CACHE_MAX_CHARS = 512


@functools.lru_cache(maxsize=1024)
def _path_verdict(dialect: str, extra: tuple[str, ...] | None, path: str
                  ) -> tuple[int, str, str] | None:
    """None when `path` (query and fragment already cut off) is allowed, else the refusal
    (status, code, message). Pure, so remembered for the few paths a gateway sees (every
    request of an agent names the same endpoint); only short paths are passed here, and
    the query (which may carry a key) is never part of the key."""
    try:
        norm = normalise(path)
    except PathError as e:
        return 400, "ambiguous_path", f"ambiguous request path refused: {e}"
    if not path_allowed(dialect, extra, norm):
        return 404, "path_not_allowed", f"{norm} is not a known {dialect} endpoint of "
    return None


class Upstreams:
    agentgate_pipeline = True  # the sentinel opens the gateway only while this is in the chain

    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder

    def _resolve(self, flow: http.HTTPFlow) -> Upstream | None:
        rules = self.holder.rules
        assert rules is not None  # RulesLoader refuses flows before rules exist
        host, port = flow.request.host, flow.request.port
        up = rules.upstream_for(host, port)
        if up is None:
            flow.metadata.pop("upstream", None)
            refuse(flow, 403, f"destination {host}:{port} is not a declared upstream "
                   "(default-deny egress)", "destination_not_allowed", STEP)
            return None
        flow.metadata["upstream"] = {"name": up.name, "dialect": up.dialect}
        return up

    @guarded(STEP)
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._resolve(flow)

    @guarded(STEP)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        up = self._resolve(flow)
        if up is None:
            return
        host, upgrade, connection = _named(flow.request.headers)
        if not self._scheme_ok(flow, up) or not self._pinned(flow, host):
            return
        if not self._upgrade_ok(flow, up, upgrade, connection):
            return
        self._path_ok(flow, up)

    @staticmethod
    def _pinned(flow: http.HTTPFlow, names: list[str]) -> bool:
        """Every name the request carries for its destination is the tunnel's target.
        `names`: the Host header's values."""
        req = flow.request
        target_host, target_port = _norm_host(req.host), req.port
        default = 443 if req.scheme == "https" else 80
        if len(names) > 1:
            refuse(flow, 400, "more than one Host header", "ambiguous_host", STEP)
            return False
        if req.authority:
            names.append(req.authority)
        for value in names:
            parsed = parse_host(value)
            if parsed is None:
                refuse(flow, 400, "malformed Host/:authority", "bad_host", STEP)
                return False
            host, port = parsed
            if _norm_host(host) != target_host or (port or default) != target_port:
                refuse(flow, 421, f"request names {value!r} inside a connection to "
                       f"{target_host}:{target_port} (Misdirected Request)",
                       "misdirected_request", STEP)
                return False
        tunnel = flow.server_conn.address is not None
        sni = flow.client_conn.sni if flow.client_conn.tls else None
        if tunnel and sni and _norm_host(sni) != target_host:
            refuse(flow, 421, f"TLS SNI {sni!r} differs from the tunnel's target "
                   f"{target_host} (Misdirected Request)", "misdirected_request", STEP)
            return False
        return True

    @staticmethod
    def _scheme_ok(flow: http.HTTPFlow, up: Upstream) -> bool:
        if flow.request.scheme == up.scheme:
            return True
        if up.scheme == "https":
            refuse(flow, 403, f"cleartext {flow.request.scheme} to the https upstream "
                   f"{up.name!r} is refused; use https", "cleartext_refused", STEP)
        else:
            refuse(flow, 403, f"upstream {up.name!r} is declared scheme: {up.scheme}",
                   "scheme_not_allowed", STEP)
        return False

    @staticmethod
    def _upgrade_ok(flow: http.HTTPFlow, up: Upstream, upgrade: str | None,
                    connection: str) -> bool:
        if upgrade is None and "upgrade" not in connection.lower():
            return True
        if (upgrade or "").strip().lower() == "websocket" and up.websocket:
            return True
        if (upgrade or "").strip().lower() == "websocket":
            refuse(flow, 403, f"WebSocket upgrades to upstream {up.name!r} are refused "
                   "(declare websocket: true to allow them)", "websocket_not_allowed", STEP)
        else:
            refuse(flow, 403, "protocol upgrades are refused", "upgrade_not_allowed", STEP)
        return False

    @staticmethod
    def _path_ok(flow: http.HTTPFlow, up: Upstream) -> bool:
        # what normalise() reads of it: the query and fragment never reach the cache
        path = flow.request.path.split("?", 1)[0].split("#", 1)[0]
        verdict = (_path_verdict if len(path) <= PATH_CACHE_MAX_CHARS
                   else _path_verdict.__wrapped__)(up.dialect, up.paths, path)
        if verdict is None:
            return True
        status, code, message = verdict
        if code == "path_not_allowed":
            message += f"upstream {up.name!r} (default-deny paths; allow it with paths:)"
        refuse(flow, status, message, code, STEP)
        return False

"""Strip every credential the agent sent and inject the upstream's real one.

Runs last on the request path, after identity, policy, masking and approval, so nothing
before it ever sees the real secret and nothing after it (the upstream) sees the agent's.
The flow itself never holds the real secret either: it carries a marker, which mitmproxy's
HTTP/1, HTTP/2 and HTTP/3 client layers replace by the secret only in the header bytes they
send upstream (install_wire_substitution). mitmweb, the dumper, flow files, the recorder
and every addon see the marker.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import secrets
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import parse_qsl, urlencode

from mitmproxy import ctx, http
from mitmproxy import version as mitmproxy_version

from addons.config.holder import RulesHolder
from addons.egress.config import SecretRef
from addons.egress.oauth import TOKENS
from addons.frame import logscrub
from addons.frame.credshape import INJECTED, is_credential_param, redact_url
from addons.frame.guard import guarded, refuse

log = logging.getLogger("agentgate.credentials")

# Headers that carry a caller credential for some API; none of them may pass.
CREDENTIAL_HEADERS = (
    "authorization", "proxy-authorization", "x-api-key", "api-key", "cookie",
    "x-goog-api-key", "x-auth-token", "x-access-token", "ocp-apim-subscription-key",
    "x-amz-security-token",
)


# (name, the name as mitmproxy compares it: lower-case bytes), encoded once
_CREDENTIAL_KEYS = tuple((name, name.lower().encode()) for name in CREDENTIAL_HEADERS)


def strip_credentials(headers: http.Headers, extra: str | None = None) -> list[str]:
    """Delete every credential header; the names removed, in CREDENTIAL_HEADERS order.

    One pass over the raw fields finds which are present (as mitmproxy's own lookup does:
    bytes lowercased), instead of one case-insensitive scan of all fields per name: this
    runs twice on every request."""
    present = {k.lower() for k, _ in headers.fields}
    removed = []
    for name, key in (_CREDENTIAL_KEYS if not extra
                      else (*_CREDENTIAL_KEYS, (extra, extra.lower().encode()))):
        if key in present:
            del headers[name]
            present.discard(key)  # `extra` may name a header already removed
            removed.append(name)
    return removed


# ---------------------------------------------------------------- the wire substitution
# The real credential never sits on the flow object: mitmweb's /flows (while the upstream's
# answer is pending: seconds, for an LLM), the dumper at any flow_detail, `-w` files, the
# recorder and every addon only ever see a marker. The marker is swapped for the secret in
# the bytes mitmproxy assembles for the upstream, and nowhere else.
REDACTED = INJECTED
# Per process and secret: a marker the agent never sees cannot be forged by it, so no
# header the agent writes can make the gateway substitute a real credential.
_NONCE = secrets.token_hex(16)
_NONCE_BYTES = _NONCE.encode()
_MARKERS: dict[bytes, tuple[bytes, SecretRef]] = {}  # marker -> (header name, where)
MAX_MARKERS = 4096

PINNED_MITMPROXY = "12.2."


@functools.lru_cache(maxsize=MAX_MARKERS)
def _marker_value(upstream: str, header: str) -> str:
    tag = hashlib.sha256(f"{upstream}\n{header.lower()}".encode()).hexdigest()[:12]
    return f"{REDACTED} {tag}.{_NONCE}"


def marker_for(upstream: str, ref: SecretRef) -> str:
    """The value put on the flow in place of the upstream's real credential."""
    value = _marker_value(upstream, ref.header)  # a pure function of both: hashed once
    key = value.encode()
    if key not in _MARKERS and len(_MARKERS) >= MAX_MARKERS:
        _MARKERS.clear()  # rules churn: forget old upstreams' markers
    _MARKERS[key] = (ref.header.lower().encode(), ref)  # (re)set: the rules may have changed
    return value


def carries_marker(value: str | bytes) -> bool:
    return (_NONCE_BYTES if isinstance(value, bytes) else _NONCE) in value  # type: ignore[operator]


def _real_for(k: Any, v: Any) -> bytes | None:
    """The real credential for header field (k, v) when v is a marker made for header k;
    raises when that secret cannot be read any more (fail the connection, never send the
    marker)."""
    hit = _MARKERS.get(bytes(v)) if len(v) > len(_NONCE) else None
    if hit is None or bytes(k).lower() != hit[0]:
        return None
    real = hit[1].resolve()
    if real is None:
        raise RuntimeError("upstream credential no longer available; not sending")
    return real.encode()


def substitute(fields: Any) -> Any:
    """Header pairs with each marker replaced by its real credential (the same object when
    there is none). Only in the header the marker was made for; a secret that cannot be
    read any more fails the connection instead of sending the marker."""
    out = None
    for i, (k, v) in enumerate(fields):
        real = _real_for(k, v)
        if real is None:
            continue
        if out is None:
            out = list(fields)
        out[i] = (k, real)
    if out is None:
        return fields
    return tuple(out) if isinstance(fields, tuple) else out


def _h1_head(orig: Callable[[http.Request], bytes]) -> Callable[[http.Request], bytes]:
    nonce = _NONCE_BYTES

    def assemble_request_head(request: http.Request) -> bytes:
        head = orig(request)
        if nonce not in head:  # every marker holds the nonce: none in this head
            return head
        # mitmproxy's head is `line CRLF k: v CRLF ... CRLF` (Headers.__bytes__): each
        # marker's bytes are replaced in place, found by the fields' lengths (the flow's
        # request keeps the marker; no copy of it is made)
        fields = request.headers.fields
        pos = len(head) - 2 - sum(len(k) + len(v) + 4 for k, v in fields)
        parts: list[bytes] = []
        last = 0
        for k, v in fields:
            real = _real_for(k, v)
            if real is not None:
                start = pos + len(k) + 2
                parts += (head[last:start], real)
                last = start + len(v)
            pos += len(k) + len(v) + 4
        if not parts:
            return head
        parts.append(head[last:])
        return b"".join(parts)
    assemble_request_head.__wrapped__ = orig  # type: ignore[attr-defined]
    return assemble_request_head


def _h2_headers(orig: Callable[..., Generator[Any, Any, list]]
                ) -> Callable[..., Generator[Any, Any, list]]:
    def format_h2_request_headers(context: Any, event: Any) -> Generator[Any, Any, list]:
        headers = yield from orig(context, event)
        return substitute(headers)
    format_h2_request_headers.__wrapped__ = orig  # type: ignore[attr-defined]
    return format_h2_request_headers


# (module, attribute, wrapper factory, the calling function, the call it must contain)
def _sites() -> list[tuple[Any, str, Callable[[Any], Any], Any, str]]:
    from mitmproxy.net.http import http1
    from mitmproxy.proxy.layers.http import _http1, _http2, _http3
    return [
        (http1, "assemble_request_head", _h1_head, _http1.Http1Client.send,
         "http1.assemble_request_head(request)"),
        (_http2, "format_h2_request_headers", _h2_headers, _http2.Http2Client._handle_event2,
         "format_h2_request_headers(self.context, event)"),
        (_http3, "format_h2_request_headers", _h2_headers, _http3.Http3Connection._handle_event,
         "format_h2_request_headers(self.context, event)"),
    ]


_installed = False


def install_wire_substitution() -> None:
    """Wrap the places where mitmproxy turns a request into header bytes for the upstream.

    Narrow and version-pinned: refuses (raises) unless this is mitmproxy 12.2.x and every
    call site still reads the wrapped name at call time; tests/egress/test_credentials.py
    checks the same, so an upgrade that moves them fails loudly instead of sending markers
    (or, worse, nothing being substituted while a later change puts secrets back on flows).
    """
    global _installed
    if _installed:
        return
    if not mitmproxy_version.VERSION.startswith(PINNED_MITMPROXY):
        raise RuntimeError(f"credential injection is pinned to mitmproxy {PINNED_MITMPROXY}x, "
                           f"running {mitmproxy_version.VERSION}: review "
                           "addons/egress/credentials.py before upgrading")
    sites = _sites()
    for _mod, _attr, _wrap, caller, call in sites:
        if call not in inspect.getsource(caller):
            raise RuntimeError(f"mitmproxy internals changed: {caller.__qualname__} no longer "
                               f"calls {call}; credential injection disabled")
    for mod, attr, wrap, _caller, _call in sites:
        current = getattr(mod, attr)
        if getattr(current, "__wrapped__", None) is None:
            setattr(mod, attr, wrap(current))
    _installed = True


def _strip_query(flow: http.HTTPFlow) -> bool:
    """Remove credential-like query parameters; True when there were any. By class
    (token/secret/key/signature-like keys, JWT-shaped values): addons/frame/credshape.py,
    which the recorder and the log scrubber share."""
    if "?" not in flow.request.path:
        return False  # no query string at all (the common case): nothing to parse
    query = flow.request.query
    if not any(is_credential_param(k, v) for k, v in query.items(multi=True)):
        return False
    kept = [(k, v) for k, v in parse_qsl(flow.request.url.partition("?")[2],
                                         keep_blank_values=True)
            if not is_credential_param(k, v)]
    flow.request.path = flow.request.path.split("?", 1)[0] + (
        "?" + urlencode(kept) if kept else "")
    return True


def secret_values(rules: Any) -> set[str]:
    """Every upstream's real credential as injected and without its prefix; for an OAuth
    credential, the client secret and the current and previous tokens."""
    vals: set[str] = set()
    for up in getattr(rules, "upstreams", ()) if rules is not None else ():
        ref = up.credential
        if ref is None:
            continue
        if ref.oauth is not None:
            vals.update(TOKENS.known(ref.oauth))
            vals.add(ref.oauth.secret() or "")
        value = ref.resolve()
        if value:
            vals.add(value)
            if ref.prefix and value.startswith(ref.prefix):
                vals.add(value[len(ref.prefix):])
    vals.discard("")
    return vals


# per OAuth client: the token values (with and without prefix) handed to the log scrubber
_scrubbed_tokens: dict[Any, set[str]] = {}


def _scrub_new_token(oauth: Any, real: str, prefix: str) -> None:
    """Scrub a new OAuth token from logs (with and without its prefix) and forget this
    client's tokens that are neither current nor previous, so rotation does not grow the
    scrubber's set without bound; every other secret in the set is kept."""
    keep = set(TOKENS.known(oauth))
    new = {real, *((real[len(prefix):],) if prefix and real.startswith(prefix) else ())}
    mine = _scrubbed_tokens.setdefault(oauth, set())
    stale = {t for t in mine if t not in new and not any(t.endswith(k) for k in keep)}
    mine.difference_update(stale)
    mine.update(new)
    if len(_scrubbed_tokens) > 256:  # rules churn: clients no longer configured
        for k in [k for k in _scrubbed_tokens if k is not oauth][:128]:
            del _scrubbed_tokens[k]
    logscrub.set_secrets((set(logscrub.secrets_known()) - stale) | new)


class Credentials:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder
        self.wire_error: str | None = None
        holder.on_change(self._rules_changed)

    def _rules_changed(self, rules: Any) -> None:
        # the log scrubber knows every real credential by value, re-read on each change
        logscrub.set_secrets(secret_values(rules))

    def load(self, loader: Any) -> None:
        logscrub.install()
        self._rules_changed(self.holder.rules)
        try:
            install_wire_substitution()
            self.wire_error = None
        except Exception as e:  # noqa: BLE001 - fail closed: refuse flows needing a key
            self.wire_error = str(e)
            log.error("agentgate: %s; requests to upstreams with a credential are refused",
                      e)

    def running(self) -> None:
        # mitmproxy's own handlers (termlog, mitmweb's event store) exist by now; the
        # dumper prints flows to a stream, not through logging.
        logscrub.install()
        master = getattr(ctx, "master", None)
        dumper = master.addons.get("dumper") if master is not None else None
        if dumper is not None:
            logscrub.wrap_stream(dumper, "outfp")

    @guarded("credentials", skip_answered=False)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Drop the agent's credentials as soon as identity has read them (identity's
        requestheaders runs just before, in chain order), so that no later step, no held
        or refused flow in mitmweb and no log line carries them; `request` strips again
        (a later addon could have added one)."""
        rules = self.holder.rules
        meta = flow.metadata.get("upstream")
        up = rules.upstream_named(meta["name"]) if rules and isinstance(meta, dict) else None
        removed = strip_credentials(flow.request.headers,
                                    up.credential.header if up and up.credential else None)
        # what the agent asked for, before the query is stripped (only when it has one)
        asked = flow.request.url if "?" in flow.request.path else ""
        if _strip_query(flow):
            removed.append("query")
            # what the agent asked for, its credential values redacted (the recorder's url)
            flow.metadata["origin_redacted"] = redact_url(asked)
        if removed:
            flow.metadata["credentials_stripped_early"] = removed

    @guarded("credentials")
    def request(self, flow: http.HTTPFlow) -> Any:
        """Strip, check, inject. Synchronous, except for an OAuth credential whose token
        must be fetched or refreshed first: then it returns a coroutine that mitmproxy
        awaits (the fetch runs in a worker thread; this flow waits, others do not)."""
        rules = self.holder.rules
        meta = flow.metadata.get("upstream")
        up = rules.upstream_named(meta["name"]) if rules and isinstance(meta, dict) else None
        if up is None:
            # Upstreams resolved this flow earlier; losing it means something is wrong.
            refuse(flow, 503, "no upstream resolved for this request", "no_upstream",
                   "credentials")
            return None
        removed = strip_credentials(flow.request.headers,
                                    up.credential.header if up.credential else None)
        if _strip_query(flow):
            removed.append("query")
        if any(_NONCE_BYTES in v for _k, v in flow.request.headers.fields):
            # only the gateway writes markers; one coming from the agent is a forgery
            refuse(flow, 400, "request carries a reserved gateway value", "forged_marker",
                   "credentials")
            return None
        if up.credential is not None and self.wire_error is not None:
            refuse(flow, 503, "credential injection is unavailable on this gateway "
                   "(see its log)", "credential_injection_unavailable", "credentials")
            return None
        if up.credential is not None and up.credential.oauth is not None \
                and TOKENS.due(up.credential.oauth):
            return self._with_token(flow, rules, up, meta, removed)
        self._inject(flow, rules, up, meta, removed)
        return None

    async def _with_token(self, flow: http.HTTPFlow, rules: Any, up: Any, meta: dict,
                          removed: list[str]) -> None:
        try:
            await TOKENS.ensure(up.credential.oauth)
            if flow.response is not None or flow.error is not None:
                return  # the client went away meanwhile
            self._inject(flow, rules, up, meta, removed)
        except Exception as exc:  # noqa: BLE001 - fail closed, as guarded() does
            log.error("agentgate: credentials.request failed (%s); refusing flow",
                      type(exc).__name__)
            refuse(flow, 503, "internal error in credentials (request); request refused",
                   "gateway_error", "credentials")

    def _inject(self, flow: http.HTTPFlow, rules: Any, up: Any, meta: dict,
                removed: list[str]) -> None:
        if up.credential is not None:
            oauth = up.credential.oauth
            real = up.credential.resolve()
            if real is None:
                if oauth is not None:
                    reason = TOKENS.reason(oauth) or "no token yet"
                    refuse(flow, 503, f"gateway could not obtain a token for upstream "
                           f"{up.name!r} from {oauth.token_url}: {reason}",
                           "credential_unavailable", "credentials")
                    return
                refuse(flow, 503, f"gateway has no credential for upstream {up.name!r} "
                       f"({up.credential.describe()} is not set)", "credential_missing",
                       "credentials")
                return
            if oauth is not None:
                if real not in logscrub.secrets_known():
                    _scrub_new_token(oauth, real, up.credential.prefix)
            else:
                # a rotated key is scrubbed from its first request on
                logscrub.add_secret(real)
                if up.credential.prefix and real.startswith(up.credential.prefix):
                    logscrub.add_secret(real[len(up.credential.prefix):])
            # The marker, not the secret: see install_wire_substitution.
            flow.request.headers[up.credential.header] = marker_for(up.name, up.credential)
        meta["stripped"] = removed
        meta["injected"] = up.credential.header if up.credential else ""
        if up.forward_to is not None:
            scheme, host, port = up.forward_to
            meta["forwarded_to"] = f"{scheme}://{host}:{port}"
            # Route to a different address (local model server, test stand-in).
            flow.request.scheme, flow.request.host, flow.request.port = scheme, host, port

    @guarded("credentials", skip_answered=False)
    def response(self, flow: http.HTTPFlow) -> None:
        """An upstream that refuses the gateway's OAuth token (revoked, rotated keys) gets a
        fresh one on the next request instead of the same refusal until expiry."""
        if flow.response is None or flow.response.status_code != 401 \
                or "refusal" in flow.metadata:
            return
        rules = self.holder.rules
        meta = flow.metadata.get("upstream")
        up = rules.upstream_named(meta["name"]) if rules and isinstance(meta, dict) else None
        if up is not None and up.credential is not None and up.credential.oauth is not None:
            TOKENS.invalidate(up.credential.oauth)
            log.info("agentgate: upstream %r refused the gateway's token; fetching a new one "
                     "on the next request", up.name)

"""The MCP addon: Streamable HTTP traffic of `dialect: mcp` upstreams, read as JSON-RPC.

Requests (before policy): a POST body must be strict JSON-RPC (one message or a batch;
addons/mcp/jsonrpc.py), or it is answered with a JSON-RPC error (-32700 / -32600 / -32602)
and never forwarded; methods an MCP client does not send are refused unless
`mcp.unknown_methods: allow`; a `tools/call` of a tool whose pinned definition changed
(or whose description the scan flagged, with `description_scan: block`) is refused
(`pinning.on_change: block`) or marked for policy to hold (`approve`). GET (the server's
own stream) and DELETE (end of session) pass on to the other steps. What the request is
goes to `flow.metadata["mcp"]` (names only, never argument values): method, tool, uri,
prompt, id, session (Mcp-Session-Id), batch (number of messages, 0 for one), pin, and for
a batch the same names per message.

Responses (after the upstream): JSON bodies and SSE streams are read message by message
(an SSE stream as it streams, one event at a time, never buffered whole). Responses are
correlated with the requests of the flow by id. A `tools/list` result is pinned
(addons/mcp/pins.py) and scanned; then every transform registered by a later concern (the
policy's tools/list filter, addons/policy/mcp.py) runs on each message. A server-to-client
`sampling/createMessage` or `elicitation/create` is dropped unless the rules allow it: the
client never sees it and the server is answered with a JSON-RPC error (a POST of its own,
straight to the upstream, with the gateway's credential for it).

An MCP session (the server's Mcp-Session-Id) stays with the identity that opened it: every
agent reaches the server with the gateway's one credential, so the server cannot tell
them apart; a request naming another identity's session is refused (rule `mcp.session`).

McpAnswers (placed just before the recorder) turns every refusal of any step on an mcp
upstream into what an MCP client reads: a JSON-RPC error per refused request, with its id,
naming the rule, in an HTTP 200 (an SDK client treats any other status as a broken
transport); a refused body of notifications only gets 202; a body that is not JSON-RPC
keeps its 400 with `id: null`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from addons.config.holder import RulesHolder
from addons.frame import decode
from addons.frame.errors import error_payload
from addons.frame.guard import guarded, refuse
from addons.frame.offload import BUSY_ANSWERS, Busy, StreamJob, run_heavy, take_ready
from addons.frame.principal import principal
from addons.mcp import blobs, jsonrpc
from addons.mcp.config import McpConfig
from addons.mcp.pins import PinStore, scope_key
from addons.mcp.sse import Event, EventTooLarge, Splitter

log = logging.getLogger("agentgate.mcp")

# A transform sees one server message (a dict) of a flow, with the method of the request
# it answers (None when it is not a response to a known request), and returns it (maybe
# changed) or None to drop it.
Transform = Callable[[http.HTTPFlow, "str | None", dict[str, Any]], "dict[str, Any] | None"]
SERVER_METHODS = frozenset({"ping", "roots/list"})
ANSWER_TIMEOUT = 10.0
MAX_SESSIONS = 100_000
# An answer (a JSON body, or the SSE events a chunk completes) whose reading and judging is
# estimated over this many microseconds (jsonrpc.parse_cost) leaves the event loop: the
# same budget as masking's (masking/cost.py LOOP_BUDGET_US; this concern runs before
# masking and cannot import it).
LOOP_BUDGET_US = 2000


def mcp_upstream(flow: http.HTTPFlow) -> dict[str, Any] | None:
    up = flow.metadata.get("upstream")
    if isinstance(up, dict) and up.get("dialect") == "mcp":
        return up
    return None


class Mcp:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder
        self.transforms: list[Transform] = []
        self._stores: dict[str, PinStore] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        # (upstream, Mcp-Session-Id) -> the subject that opened it (bounded, oldest out)
        self._sessions: dict[tuple[Any, str], str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- configuration
    def config(self) -> McpConfig:
        rules = self.holder.rules
        if rules is None:
            raise RuntimeError("no rules loaded")
        cfg = getattr(rules, "mcp", None)
        return cfg if isinstance(cfg, McpConfig) else McpConfig()

    def store(self, cfg: McpConfig) -> PinStore:
        path = cfg.pinning.store
        if path is None:
            data = getattr(ctx.options, "agentgate_data", "data") if ctx.master else "data"
            path = str(Path(data) / "mcp-pins.json")
        st = self._stores.get(path)
        if st is None:
            st = self._stores[path] = PinStore(path)
        return st

    def scope(self, cfg: McpConfig, flow: http.HTTPFlow, server: str) -> str:
        # per identity: issuer AND subject (the same `sub` from another issuer is another
        # agent, frame/principal.py); "-" without a token
        return scope_key(server, principal(flow.metadata.get("identity")),
                         cfg.pinning.scope == "identity")

    # -- requests
    @guarded("mcp")
    async def request(self, flow: http.HTTPFlow) -> None:
        up = mcp_upstream(flow)
        if up is None:
            return
        cfg = self.config()
        req = flow.request
        meta: dict[str, Any] = {"method": None, "tool": None, "uri": None, "prompt": None,
                                "id": None, "session": req.headers.get("mcp-session-id"),
                                "batch": 0, "pin": None, "ids": []}
        flow.metadata["mcp"] = meta
        # the gateway reads every response as it streams: no compression to undo
        req.headers["accept-encoding"] = "identity"
        sid = meta["session"]
        if sid is not None:
            owner = self._sessions.get((up.get("name"), sid))
            if owner is not None and owner != principal(flow.metadata.get("identity")):
                # every agent reaches the server with the gateway's one credential: the
                # server cannot tell them apart, so the gateway keeps each MCP session to
                # the identity that opened it
                log.warning("agentgate: mcp: a session of %s used by another identity; "
                            "refused", up.get("name"))
                refuse(flow, 403, "this MCP session belongs to another identity",
                       "mcp_session_refused", "mcp", rule="mcp.session")
                return
        if req.method in ("GET", "DELETE"):
            meta["method"] = "<stream>" if req.method == "GET" else "<end-session>"
            return
        if req.method != "POST":
            refuse(flow, 405, f"{req.method} is not an MCP Streamable HTTP method",
                   "invalid_jsonrpc", "mcp")
            return
        try:
            payload = await _off_loop(_read_payload, flow, "request", cfg.max_event_bytes)
        except Busy as e:
            # the body was not read (that is the heavy work refused): the id its client
            # waits for, from the body's first bytes, so the answer is a JSON-RPC error
            # for that request, not a transport error
            if not req.headers.get("content-encoding"):
                found, rid = jsonrpc.head_id(req.raw_content or b"")
                if found:
                    meta["ids"] = [rid]
            refuse(flow, e.status, e.message, "busy", "mcp", headers={"retry-after": "1"})
            return
        except decode.TooLarge:
            refuse(flow, 413, f"JSON-RPC body over mcp.max_event_bytes "
                   f"({cfg.max_event_bytes} bytes)", "body_too_large", "mcp")
            return
        except decode.DecodeError as e:
            refuse(flow, 400, f"cannot read the JSON-RPC body: {e.reason}", "invalid_json",
                   "mcp")
            return
        except jsonrpc.JsonRpcError as e:
            if e.id is not None:
                meta["ids"] = [e.id]
            code = {jsonrpc.PARSE_ERROR: "invalid_json",
                    jsonrpc.INVALID_PARAMS: "invalid_params"}.get(e.code, "invalid_jsonrpc")
            refuse(flow, 400, f"invalid JSON-RPC: {e.message}", code, "mcp")
            return
        msgs = payload.messages
        meta["parsed"] = True
        first = msgs[0]
        meta.update({k: v for k, v in first.names().items() if k != "kind"})
        meta["ids"] = [m.id for m in msgs if m.is_request]
        if payload.batch:
            meta["batch"] = len(msgs)
            meta["messages"] = [m.names() for m in msgs]
        if cfg.unknown_methods == "deny":
            for m in msgs:
                if m.method is not None and m.method not in jsonrpc.CLIENT_METHODS \
                        and not m.method.startswith("notifications/"):
                    refuse(flow, 403, f"MCP method {m.method[:80]!r} is not allowed",
                           "mcp_method_refused", "mcp", rule="mcp.unknown_methods")
                    return
        calls = [m for m in msgs if m.method == "tools/call"]
        if calls and (cfg.pinning.enabled or cfg.description_scan == "block"):
            store = self.store(cfg)
            await asyncio.to_thread(store.refresh)
            server = up.get("name") or ""
            scope = self.scope(cfg, flow, server)
            for m in calls:
                tool = (m.tool or "")[:100]
                state, sus = store.status(scope, m.tool or "")
                if not cfg.pinning.enabled:
                    state = None if state is None else "same"
                if cfg.description_scan != "block":
                    sus = []
                if state == "changed" or sus:
                    why = (f"tool {tool!r} of {server!r} changed since it was pinned"
                           if state == "changed" else
                           f"tool {tool!r} of {server!r} has a suspicious description "
                           f"({', '.join(sus)})")
                    meta["pin"] = "changed"
                    meta.setdefault("pin_changed", []).append(tool)
                    log.warning("agentgate: mcp: call to %s/%r: %s", server, tool,
                                "pin changed" if state == "changed" else
                                "flagged by the description scan")
                    if cfg.pinning.on_change == "block" or sus:
                        refuse(flow, 403, f"{why}; an operator must accept it: agentgate "
                               f"mcp pins accept {server} {tool}",
                               "mcp_pin_changed", "mcp", rule=f"mcp.pin:{tool}")
                        return
                elif meta["pin"] is None:
                    meta["pin"] = "same" if state == "same" else None

    # -- responses
    @guarded("mcp")
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # the loop a worker thread answers the server from (an SSE event judged off it)
        self._loop = asyncio.get_running_loop()
        resp = flow.response
        if resp is None or "refusal" in flow.metadata or mcp_upstream(flow) is None:
            return
        sid = resp.headers.get("mcp-session-id")
        meta = flow.metadata.get("mcp")
        if sid and isinstance(meta, dict) and not meta.get("session"):
            meta["session"] = sid
            key = (mcp_upstream(flow) or {}).get("name"), sid
            if key not in self._sessions:
                if len(self._sessions) >= MAX_SESSIONS:
                    self._sessions.pop(next(iter(self._sessions)))  # the oldest
                # issuer AND subject: the same sub from another issuer is another agent
                self._sessions[key] = principal(flow.metadata.get("identity"))
        if not resp.headers.get("content-type", "").lower().startswith("text/event-stream"):
            return
        enc = resp.headers.get("content-encoding", "").strip().lower()
        if enc not in ("", "identity"):
            refuse(flow, 502, "a compressed MCP event stream cannot be inspected",
                   "unmaskable_body", "mcp")
            return
        resp.stream = McpStream(self, flow, self.config())
        # Events may be dropped or rewritten: the length the server declared is not the
        # body's (a client would wait for bytes that never come, or stop short). Masking
        # does the same when it wraps this stream; with `mask: false` nobody else would.
        if "content-length" in resp.headers:
            del resp.headers["content-length"]
            if flow.request.http_version == "HTTP/1.1":  # the client side's framing
                resp.headers["transfer-encoding"] = "chunked"

    @guarded("mcp")
    async def response(self, flow: http.HTTPFlow) -> None:
        self._loop = asyncio.get_running_loop()
        resp = flow.response
        if resp is None or resp.stream or "refusal" in flow.metadata \
                or mcp_upstream(flow) is None:
            return
        if not resp.raw_content:
            return  # 202 Accepted
        if not decode.is_json_mime(decode.parse_content_type(
                resp.headers.get("content-type", ""))[0]):
            if resp.status_code == 200 and flow.request.method == "POST":
                # a success that is neither JSON nor an event stream: no MCP client reads
                # it as JSON-RPC, and a lenient one must not read past the gateway's checks
                refuse(flow, 502, "the MCP server answered with neither JSON nor an event "
                       "stream", "upstream_invalid_jsonrpc", "mcp")
            return  # an HTTP error text (masked like any response)
        cfg = self.config()
        try:
            payload = await _off_loop(_read_payload, flow, "response", cfg.max_event_bytes)
            if _heavy_answer(resp):
                # in this identity's share of the worker threads (frame/offload.py), not
                # asyncio's executor: one identity's flood of large answers must not take
                # every thread the others' work waits for
                out = await run_heavy(flow, self.process, flow, cfg, payload.messages,
                                      payload.payloads)
            elif _has_tools(payload):
                # a small tool list: the pin store's file (read, locked, written) in a
                # thread of its own (I/O: it must not hold a heavy-work slot)
                out = await asyncio.to_thread(self.process, flow, cfg, payload.messages,
                                              payload.payloads)
            else:
                out = self.process(flow, cfg, payload.messages, payload.payloads)
        except Busy as e:
            refuse(flow, e.status, f"the MCP server's answer cannot be judged now: "
                   f"{e.message}", "busy", "mcp", headers={"retry-after": "1"})
            return
        except (decode.DecodeError, jsonrpc.JsonRpcError) as e:
            reason = e.reason if isinstance(e, decode.DecodeError) else e.message
            refuse(flow, 502, f"the MCP server's answer is not valid JSON-RPC: {reason}",
                   "upstream_invalid_jsonrpc", "mcp")
            return
        if out is None:
            return
        if not out:
            resp.status_code, resp.content = 202, b""
            resp.headers.pop("content-type", None)
            return
        resp.headers.pop("content-encoding", None)
        resp.content = jsonrpc.dumps(out if payload.batch else out[0])

    # -- server messages
    def process(self, flow: http.HTTPFlow, cfg: McpConfig,
                msgs: tuple[jsonrpc.Message, ...], payloads: bool = True
                ) -> list[dict[str, Any]] | None:
        """The messages to pass on (None: all unchanged)."""
        out: list[dict[str, Any]] = []
        changed = False
        for m in msgs:
            new = self.server_message(flow, cfg, m, payloads)
            if new is not m.raw:
                changed = True
            if new is not None:
                out.append(new)
        return out if changed else None

    def server_message(self, flow: http.HTTPFlow, cfg: McpConfig, m: jsonrpc.Message,
                       payloads: bool = True) -> dict[str, Any] | None:
        """`payloads`: the message's text may hold a `blob` / `data` member (False only
        when its text was checked: jsonrpc.may_hold_payloads)."""
        up = mcp_upstream(flow) or {}
        server = up.get("name") or ""
        if m.kind in ("request", "notification"):
            obj = self._server_request(flow, cfg, m, server) if m.kind == "request" \
                else m.raw
            # a sampling/createMessage let through carries images and embedded resources
            # to the agent's LLM as a result does: its base64 payloads are read the same
            return self._readable(flow, obj, m.id) if obj is not None and payloads else obj
        meta = flow.metadata.get("mcp")
        method = None
        if isinstance(meta, dict):
            if meta.get("batch"):
                for item in meta.get("messages") or ():
                    if item.get("kind") == "request" and item.get("id") == m.id:
                        method = item.get("method")
            elif meta.get("id") == m.id and m.id is not None:
                method = meta.get("method")
        obj: dict[str, Any] | None = m.raw
        result = obj.get("result") if m.kind == "response" else None
        # a tools/list answer, by its shape whatever it claims to answer: a resumed stream
        # has no request, and a hostile server may slip a tool list into any answer
        if isinstance(result, dict) and isinstance(result.get("tools"), list):
            obj = self._tools_list(flow, cfg, obj, server)
            method = "tools/list"
        for t in self.transforms:
            if obj is None:
                break
            obj = t(flow, method, obj)
        if obj is not None and m.kind == "response" and payloads:
            obj = self._readable(flow, obj, m.id)
        return obj

    @staticmethod
    def _readable(flow: http.HTTPFlow, obj: dict[str, Any], mid: Any) -> dict[str, Any]:
        """Text sent as base64 (a resource blob, image/audio data) as text, so masking reads
        it in every method's result (blobs.py); a result too deep to walk is answered with
        a JSON-RPC error for its id instead (fail closed)."""
        try:
            new, changed = blobs.readable(obj)
        except blobs.TooDeep as e:
            meta = flow.metadata.setdefault("mcp", {})
            meta.setdefault("refused_results", []).append(str(mid)[:80])
            log.warning("agentgate: mcp: a result of %s refused: %s",
                        (mcp_upstream(flow) or {}).get("name"), e)
            return jsonrpc.error_message(mid, jsonrpc.INTERNAL_ERROR,
                                         f"agentgate: the MCP server's result was refused: {e}",
                                         {"code": "upstream_invalid_jsonrpc", "status": 502})
        if changed:
            flow.metadata.setdefault("mcp", {})["blobs_as_text"] = True
        return new

    def _server_request(self, flow: http.HTTPFlow, cfg: McpConfig, m: jsonrpc.Message,
                        server: str) -> dict[str, Any] | None:
        meth = m.method or ""
        if meth == jsonrpc.SAMPLING:
            ok = cfg.allows(cfg.allow_sampling, server)
        elif meth == jsonrpc.ELICITATION:
            ok = cfg.allows(cfg.allow_elicitation, server)
        else:
            ok = meth in SERVER_METHODS or cfg.unknown_methods == "allow"
        if ok:
            return m.raw
        meta = flow.metadata.setdefault("mcp", {})
        meta.setdefault("refused_server_requests", []).append(meth[:80])
        log.warning("agentgate: mcp: %s from %s refused (not allowed by the rules); the "
                    "client never sees it", meth[:80], server)
        self.answer_server(flow, m.id, f"agentgate: {meth[:80]} is not allowed by the "
                           f"gateway's rules (mcp.allow_"
                           f"{'elicitation' if meth == jsonrpc.ELICITATION else 'sampling'})")
        return None

    def _tools_list(self, flow: http.HTTPFlow, cfg: McpConfig, obj: dict[str, Any],
                    server: str) -> dict[str, Any]:
        tools = [t for t in obj["result"]["tools"] if isinstance(t, dict)]
        meta = flow.metadata.setdefault("mcp", {})
        if not cfg.pinning.enabled and cfg.description_scan == "off":
            return obj
        store = self.store(cfg)
        scope = self.scope(cfg, flow, server)
        states = store.observe(scope, tools)
        changed = sorted(n for n, (s, _) in states.items() if s == "changed")
        new = sorted(n for n, (s, _) in states.items() if s == "new")
        suspicious = {n: r for n, (_, r) in states.items() if r} \
            if cfg.description_scan != "off" else {}
        if cfg.pinning.enabled:
            meta["pins"] = {"new": new[:200], "changed": changed[:200]}
            if changed:
                log.warning("agentgate: mcp: %s changed tool definitions since pinned: %s "
                            "(calls %s until accepted: agentgate mcp pins accept %s <tool>)",
                            server, ", ".join(changed[:20]),
                            "blocked" if cfg.pinning.on_change == "block" else "held",
                            server)
        if suspicious:
            meta["suspicious"] = {n: r for n, r in list(suspicious.items())[:200]}
            log.warning("agentgate: mcp: %s tool descriptions flagged: %s", server,
                        "; ".join(f"{n} ({', '.join(r)})" for n, r in
                                  list(suspicious.items())[:20]))
            if cfg.description_scan == "block":
                result = dict(obj["result"])
                result["tools"] = [t for t in obj["result"]["tools"]
                                   if not (isinstance(t, dict) and t.get("name") in suspicious)]
                obj = {**obj, "result": result}
        return obj

    # -- answering the server
    def answer_server(self, flow: http.HTTPFlow, rid: Any, message: str) -> None:
        """POST a JSON-RPC error for the server's request `rid` to the server, directly
        (not through the proxy: this is the gateway speaking for the client). What to send
        is taken from the flow now; the POST runs as a task on the event loop."""
        req = self._answer_request(flow, rid, message)
        if req is None:
            return

        def start() -> None:
            task = asyncio.ensure_future(self._answer(*req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a JSON answer is judged in a worker thread
            if self._loop is None:
                log.error("agentgate: mcp: no event loop to answer the server from")
                return
            self._loop.call_soon_threadsafe(start)
            return
        start()

    def _answer_request(self, flow: http.HTTPFlow, rid: Any, message: str
                        ) -> tuple[str, dict[str, str], bytes, dict[str, str] | None] | None:
        """(url, headers, body, hostname mapping) of the answer, or None."""
        up_meta = mcp_upstream(flow) or {}
        rules = self.holder.rules
        up = rules.upstream_named(up_meta.get("name")) if rules is not None else None
        req = flow.request
        resp = flow.response
        headers = {"content-type": "application/json",
                   "accept": "application/json, text/event-stream",
                   "host": req.host_header or req.host}
        sid = (resp.headers.get("mcp-session-id") if resp is not None else None) or \
            req.headers.get("mcp-session-id")
        if sid:
            headers["mcp-session-id"] = sid
        if req.headers.get("mcp-protocol-version"):
            headers["mcp-protocol-version"] = req.headers["mcp-protocol-version"]
        if up is not None and up.credential is not None:
            real = up.credential.resolve()
            if real is None:
                log.error("agentgate: mcp: no credential to answer %s", up.name)
                return None
            headers[up.credential.header] = real
        body = jsonrpc.dumps(jsonrpc.error_message(rid, jsonrpc.REFUSED, message))
        # connect to the address the flow was vetted and sent to (no second DNS answer)
        peer = flow.server_conn.peername
        mapping = {req.host: peer[0]} if peer else None
        return req.url.split("?", 1)[0], headers, body, mapping

    async def _answer(self, url: str, headers: dict[str, str], body: bytes,
                      mapping: dict[str, str] | None) -> None:
        from tornado import httpclient, simple_httpclient

        ssl_ctx: ssl.SSLContext | None = None
        if url.startswith("https:"):
            ca = getattr(ctx.options, "ssl_verify_upstream_trusted_ca", None) \
                if ctx.master else None
            ssl_ctx = await asyncio.to_thread(ssl.create_default_context, cafile=ca)
            if ctx.master and getattr(ctx.options, "ssl_insecure", False):
                ssl_ctx.check_hostname = False
                ssl_ctx.verify_mode = ssl.CERT_NONE
        client = simple_httpclient.SimpleAsyncHTTPClient(
            force_instance=True, max_body_size=64 * 1024, hostname_mapping=mapping)
        try:
            r = await client.fetch(httpclient.HTTPRequest(
                url, method="POST", body=body, headers=headers,
                connect_timeout=ANSWER_TIMEOUT, request_timeout=ANSWER_TIMEOUT,
                follow_redirects=False, ssl_options=ssl_ctx, decompress_response=False),
                raise_error=False)
            if r.code >= 400:
                log.warning("agentgate: mcp: the server answered %s to the gateway's refusal",
                            r.code)
        except Exception as e:  # noqa: BLE001 - best effort; the client is protected already
            log.warning("agentgate: mcp: could not answer the server (%s)", type(e).__name__)
        finally:
            client.close()


class McpStream:
    """The stream function of one SSE response: events in, events out, each JSON-RPC
    message judged as it arrives. An event that cannot be judged (not JSON-RPC, too large)
    ends what the agent gets of the stream: in its place the agent gets a JSON-RPC error
    for each request of the flow (an MCP client raises it instead of waiting for an answer
    that will not come), and the rest of the upstream's stream is swallowed.

    Heavy events leave the event loop (a hostile server's one event of 4 MB of small JSON
    values took ~0.3 s to parse, judge and write back, holding every other flow): before
    each call the HTTP layer asks (masking/streamwork.py) `agentgate_offload(data)` — or,
    when masking wraps this function, masking asks `agentgate_heavy(data)` and runs both
    in its job —, which adds up the estimated work of the chunks since no event was
    pending (jsonrpc.parse_cost; a tool list: the pin store's file too); when the chunk
    may complete an event and the sum is over LOOP_BUDGET_US, the call runs in a worker
    thread (the identity's share, frame/offload.py) while the stream's layer waits: later
    chunks queue behind it, so events stay in order. Same calls, same output either way."""

    def __init__(self, addon: Mcp, flow: http.HTTPFlow, cfg: McpConfig) -> None:
        self.addon = addon
        self.flow = weakref.proxy(flow)
        self.cfg = cfg
        self.splitter = Splitter(cfg.max_event_bytes)
        self.failed = False
        self._cost = 0  # estimated us of the work held (events pending)
        self._tools = False  # a tool list may be pending (the pin store's file)
        self._tail = b""  # the last bytes of the previous chunk (a blank line cut in two)
        self._ready: tuple[bytes, StreamJob] | None = None

    def agentgate_heavy(self, data: bytes) -> bool:
        """Asked once per chunk, before the call with it: is the work that call may do
        (the events `data` completes) heavy? Never raises (an error: heavy)."""
        try:
            if self.failed:
                return False
            tail, self._tail = self._tail, data[-8:]
            self._cost += jsonrpc.parse_cost(data)
            self._tools = self._tools or b"tools" in tail + data[:8] or b"tools" in data
            if not (self._cost > LOOP_BUDGET_US or self._tools):
                return False
            # only a blank line ends an event (or the end of the stream): a chunk in the
            # middle of one is split only, on the loop
            return data == b"" or b"\n\n" in data or b"\r\r" in data or b"\n\r" in data \
                or (tail[-1:] in (b"\r", b"\n") and data[:1] in (b"\r", b"\n"))
        except Exception:  # noqa: BLE001 - in doubt, off the loop
            return True

    def agentgate_offload(self, data: bytes) -> StreamJob | None:
        """masking/streamwork.py (this function is the response's stream, masking does not
        wrap it): a job for a worker thread when the work is heavy, else None."""
        self._ready = None
        if not self.agentgate_heavy(data):
            return None
        job = StreamJob(self.flow, lambda: self._judge(data))
        self._ready = (data, job)
        return job

    def __call__(self, data: bytes) -> list[bytes] | bytes:
        job = take_ready(self, data)
        if job is not None:
            if job.error is not None:
                # _judge answers its own errors: this is the hook's (the identity's share
                # of the worker threads is full: frame/offload.Busy). The events were not
                # judged: none passes, the agent gets JSON-RPC errors (fail closed).
                out: list[bytes] | bytes = self.fail(
                    "the gateway is too busy to judge it now; retry later")
            else:
                out = job.result
        else:
            out = self._judge(data)
        if not self.splitter.pending():
            self._cost, self._tools = 0, False  # no event pending: the estimate starts again
        return out

    def _judge(self, data: bytes) -> list[bytes] | bytes:
        if self.failed:
            return []
        try:
            events = self.splitter.end() if data == b"" else self.splitter.feed(data)
            out = [self.event(lines) for lines in events]
        except (EventTooLarge, jsonrpc.JsonRpcError) as e:
            return self.fail(e.message if isinstance(e, jsonrpc.JsonRpcError) else str(e))
        except Exception as e:  # noqa: BLE001 - fail closed: never pass an unjudged event
            return self.fail(f"internal error ({type(e).__name__})")
        return [b for b in out if b]

    def fail(self, reason: str) -> list[bytes]:
        self.failed = True
        flow: Any = self.flow
        meta = flow.metadata.setdefault("mcp", {})
        meta["stream_refused"] = reason[:200]
        up = mcp_upstream(flow) or {}
        log.error("agentgate: mcp: event stream from %s cut: %s", up.get("name"), reason[:200])
        err = {"code": jsonrpc.REFUSED,
               "message": f"agentgate: the MCP server's answer could not be inspected "
                          f"({reason[:200]}); refused",
               "data": {"code": "upstream_invalid_jsonrpc"}}
        return [b"event: message\ndata: " + jsonrpc.dumps(
            {"jsonrpc": "2.0", "id": i, "error": err}) + b"\n\n"
            for i in (meta.get("ids") or ())]

    def event(self, lines: list[bytes]) -> bytes:
        ev = Event.parse(lines)
        if ev.data is None:
            return ev.render()
        if ev.name == "endpoint":
            # the older HTTP+SSE transport: where to POST, a path on this same server
            if not (ev.data.startswith("/") and not ev.data.startswith("//")) or \
                    any(c in ev.data for c in "\r\n\\"):
                raise jsonrpc.JsonRpcError(jsonrpc.INVALID_REQUEST,
                                           "endpoint event is not a path on this server")
            return ev.render()
        payload = jsonrpc.parse_payload(jsonrpc.loads_strict(ev.data))
        payloads = jsonrpc.may_hold_payloads(ev.data)
        flow: Any = self.flow
        out = self.addon.process(flow, self.cfg, payload.messages, payloads)
        if out is None:
            return ev.render()
        if not out:
            return b""
        return ev.render(json.dumps(out if payload.batch else out[0], ensure_ascii=False,
                                    separators=(",", ":")))


def _busy_answer(flow: Any) -> list[bytes] | None:
    """frame/offload.BUSY_ANSWERS: a stream job of an mcp upstream's event stream refused by
    the pool (masking's job wrapping this addon's stream, or this addon's own) answers each
    pending request with a JSON-RPC error event; the stream passes nothing more."""
    resp = getattr(flow, "response", None)
    if resp is None or mcp_upstream(flow) is None:
        return None
    stream = resp.stream
    for _ in range(4):  # masking's stream wraps this addon's as `before`
        if isinstance(stream, McpStream):
            if stream.failed:
                return []
            return stream.fail("the gateway is too busy to judge it now; retry later")
        stream = getattr(stream, "before", None)
    return None


BUSY_ANSWERS.append(_busy_answer)


class McpAnswers:
    """Refusals on mcp upstreams as JSON-RPC answers (see the module docstring).

    A refusal made before the response is sent is rewritten at `response`. One made at
    `responseheaders` with a stream that swallows the upstream's body (masking's answer to
    a response it cannot mask) is rewritten here at `responseheaders`, which runs after
    every other step's: the status and headers are not on the wire yet, the body is what
    the stream emits at its end."""

    @guarded("mcp", skip_answered=False)
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or not callable(resp.stream) or not self._refused(flow):
            return
        status, body = _answer_for(flow)
        resp.status_code = status
        resp.headers["content-type"] = "application/json"
        resp.headers.pop("content-length", None)
        resp.headers.pop("content-encoding", None)
        sent = [False]

        def swallow(data: bytes) -> list[bytes]:
            if data == b"" and not sent[0]:
                sent[0] = True
                return [body] if body else []
            return []
        resp.stream = swallow
        flow.metadata["mcp_answered"] = True

    @guarded("mcp", skip_answered=False)
    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or flow.metadata.get("mcp_answered") or not self._refused(flow):
            return
        status, body = _answer_for(flow)
        resp.status_code = status
        resp.headers.pop("content-encoding", None)
        resp.content = body
        if body:
            resp.headers["content-type"] = "application/json"
        else:
            resp.headers.pop("content-type", None)

    @staticmethod
    def _refused(flow: http.HTTPFlow) -> bool:
        return isinstance(flow.metadata.get("refusal"), dict) and \
            mcp_upstream(flow) is not None


def _answer_for(flow: http.HTTPFlow) -> tuple[int, bytes]:
    """(status, body) of the JSON-RPC answer to a refused flow: an error per request id
    (HTTP 200), nothing for notifications only (202), else one error with id null (the
    refusal's own status). Built from the refusal record, never from the body (which may
    be the upstream's by now)."""
    ref = flow.metadata["refusal"]
    meta = flow.metadata.get("mcp")
    if isinstance(meta, dict) and "ids" in meta:
        ids = list(meta.get("ids") or ())
        batch = bool(meta.get("batch"))
        notifications_only = not ids and bool(meta.get("parsed"))
    else:
        ids, batch, notifications_only = _ids_of(flow)
    status = ref.get("status") if isinstance(ref.get("status"), int) else 502
    err = error_payload("mcp", status, str(ref.get("message") or "request refused"),
                        str(ref.get("code") or "refused"), ref.get("rule") or None)["error"]
    if ids:
        answers = [{"jsonrpc": "2.0", "id": i, "error": err} for i in ids]
        return 200, jsonrpc.dumps(answers if batch else answers[0])
    if notifications_only:
        return 202, b""
    return status, jsonrpc.dumps({"jsonrpc": "2.0", "id": None, "error": err})


# Bodies from this many bytes on (and compressed ones) are decoded and parsed in a worker
# thread, so the event loop keeps serving other flows meanwhile.
THREAD_MIN_BYTES = 64 * 1024


async def _off_loop(fn: Callable[..., Any], flow: http.HTTPFlow, part: str, *args: Any
                    ) -> Any:
    """`fn(flow, part, *args)`: large or compressed bodies in the identity's share of the
    worker threads (frame/offload.py; raises Busy when that share's queue is full)."""
    msg = getattr(flow, part)
    if len(msg.raw_content or b"") >= THREAD_MIN_BYTES or msg.headers.get("content-encoding"):
        return await run_heavy(flow, fn, flow, part, *args)
    return fn(flow, part, *args)


def _has_tools(payload: jsonrpc.Payload) -> bool:
    """Does an answer carry a tool list (by its shape: server_message's test)?"""
    for m in payload.messages:
        result = m.raw.get("result") if m.kind == "response" else None
        if isinstance(result, dict) and isinstance(result.get("tools"), list):
            return True
    return False


def _heavy_answer(msg: http.Response) -> bool:
    """Is judging this answer heavy work (by its size on the wire and its JSON values;
    compressed: its decoded size is not known)?"""
    raw = msg.raw_content or b""
    return len(raw) >= THREAD_MIN_BYTES or bool(msg.headers.get("content-encoding")) or \
        jsonrpc.parse_cost(raw) > LOOP_BUDGET_US


def _read_payload(flow: http.HTTPFlow, part: str, max_bytes: int) -> jsonrpc.Payload:
    """The JSON-RPC payload of the request or response body, read through the one decoder.
    Raises decode.DecodeError or jsonrpc.JsonRpcError."""
    read = decode.request_body if part == "request" else decode.response_body
    body = read(flow, max_bytes=max_bytes)
    text = body.text if body is not None else ""
    payload = jsonrpc.parse_payload(jsonrpc.loads_strict(text))
    return dataclasses.replace(payload, payloads=jsonrpc.may_hold_payloads(text))


def _ids_of(flow: http.HTTPFlow) -> tuple[list[Any], bool, bool]:
    """Best effort, for a flow refused before the mcp addon read it (identity, egress)."""
    try:
        body = decode.request_body(flow, max_bytes=1 << 20)
        payload = jsonrpc.parse_payload(jsonrpc.loads_strict(body.text if body else ""))
    except Exception:  # noqa: BLE001 - unreadable: answered with id null
        return [], False, False
    ids = [m.id for m in payload.messages if m.is_request]
    return ids, payload.batch, not ids

"""The masking addon: PII and secrets masked in requests, responses and live SSE streams.

A thin adapter from flows to the pure modules:
  addons.masking.detectors  where values are (the detector engine)
  addons.masking.masker     what replaces them, and the per-session placeholder map
  addons.masking.bodies     where inside a body (JSON-aware placement, forms, multipart, encodings)
  addons.masking.sse   incremental masking of text/event-stream responses

Hooks:
- requestheaders: refuse early what can never be masked (a declared body over
  `masking.max_body_bytes`, a request mitmproxy is streaming);
- request: mask the URL path (segments, percent-decoded), the query string, the request
  headers (names and values, except `masking.headers_pass` and credentials) and the body
  before it leaves (runs after identity and policy, before approval and credentials; the
  recorder stores the flow as it is after this hook, i.e. exactly what was forwarded);
  multipart field and file names are masked with the body; a body that cannot be parsed is refused
  (400/415 in the caller's dialect) unless `masking.on_unparseable: pass_text`; a body
  that had a Content-Encoding is sent re-encoded as identity when it changed;
- responseheaders: `text/event-stream` responses are streamed through a StreamMasker
  (never buffered whole); Content-Encoding is undone on the fly and sent as identity.
  Where masking does not apply, SSE is still streamed (mitmproxy would buffer it whole).
  A non-SSE response mitmproxy would stream (stream_large_bodies) or one declared over
  `max_body_bytes` is refused (502), since it cannot be masked whole;
- response: other responses are masked whole; with `restore: true` on the upstream, the
  placeholders of this session in the model's answer are put back for the agent.
  Response headers (except `masking.headers_pass`) are masked at responseheaders, for
  every response, and never restored (they are recorded as the agent gets them).

Restore never reaches the audit store: the answer is masked first and restored in a second,
detection-free pass; the masked answer is left in `flow.metadata["masked_response"]`
(bytes, decoded), which the recorder stores instead of what the agent got (body column and
flow state). For SSE the masked stream is accumulated as events go out (at most
`max_body_bytes`, then cut with an SSE comment saying so) and set at the end of the stream.

Upstreams with `mask: false` and `masking.enabled: false` skip all of it. Findings per flow
go to `flow.metadata["findings"]` = {ENTITY: {"count": n, "strategy": s}}, never a value.

Session (whose placeholders are stable, and whose originals may be restored): the
recorder's `flow.metadata["session"]` if set (header or connection, and a body-named
thread set by recording/sessions.py before masking runs), else the agent's `X-Agent-Session` header,
else the client connection; always bound to the identity subject as well, so a session id
alone never reaches another identity's values. The session is fixed when the request is
masked and reused for its response.

Incremental: an LLM request re-sends its whole history every turn; each message of it is
masked as a unit, and one this session already sent is taken from the session's message
cache (bodies.MessageCache: in memory, bounded, dropped with the placeholder session, keyed
by identity and session like it), so a turn costs what its new messages cost. A hit is
byte-identical to masking the message again (tests/masking/test_session_cache.py).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mitmproxy import ctx, http

from addons.config.holder import RulesHolder
from addons.frame import decode
from addons.frame.guard import guarded, refuse
from addons.frame.offload import Busy, StreamJob, run_heavy, take_ready
from addons.frame.principal import flow_session_key
from addons.masking import cost
from addons.masking.bodies import (
    Masked,
    MessageCache,
    MessageCaches,
    TooLarge,
    Unparseable,
    _message_list_key,
    decode_content,
    shared_json,
)
from addons.masking.masker import (
    Masker,
    Session,
    SessionStore,
    hmac_key_from_env,
    merge,
)
from addons.masking.sessionstore import SecretMissing, SharedSession, shared_from_env
from addons.masking.sse import StreamDecoder, StreamMasker
from addons.masking.streamwork import install, upstream_transport

log = logging.getLogger("agentgate.masking")

# Bodies above this many bytes are masked in a worker thread, so that the event loop
# keeps serving other flows meanwhile.
THREAD_MIN_BYTES = 64 * 1024
# ... unless the flow's parse (policy's, with the session's memo) found it continues the
# session's previous body by at most this much: masking then takes the known messages from
# the session's cache and masks only the new part, less work than the hand-over to a
# thread and back (ThreadPoolExecutor.submit and the GIL ping-pong), as policy does
INLINE_NEW_CHARS = 16 * 1024
# and is at most this long: what stays proportional to the whole body (the replay check of
# the history's placeholders, joining the masked messages) then stays a few ms at worst
INLINE_MAX_BYTES = 1024 * 1024
# Heavy bodies go to a worker thread whatever their size: masking/cost.py estimates the
# work from C-level byte counts (shared with the database relay's rows).
# The message caches are a speed-up only (a miss masks the message again, with the same
# placeholders): at most 16 MiB in all and 4 MiB per session (a 4 MB history, ~1M tokens,
# still hits whole), so that with the placeholder maps (masker.MAX_BYTES, 16 MiB) a
# gateway an agent fills on purpose stays near the memory target (issue 16: peak RSS at
# most twice bare mitmdump's ~105 MiB; the multi-turn bench peaks at ~180 MiB). Before:
# 256 MiB and 16 MiB.
MESSAGE_CACHE_BYTES = 16 << 20
MESSAGE_CACHE_SESSION_BYTES = 4 << 20

# The hash strategy's key when `masking.hmac_key_env` names no set variable: random per
# process (stable across rules reloads), so hashes correlate within one gateway run only.
_PROCESS_KEY = hmac_key_from_env(None)[0]


def _decoded(flow: Any, part: str, raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` with its Content-Encoding undone: the flow's shared, cached decode (policy has
    usually decoded this very body already, with the same limit), else a decode here."""
    msg = getattr(flow, part, None) if flow is not None else None
    if msg is None or msg.raw_content is not raw \
            or msg.headers.get("content-encoding", "") != encoding:
        return decode_content(raw, encoding, limit)
    try:
        got = (decode.request_body if part == "request" else decode.response_body)(
            flow, max_bytes=limit)
    except decode.TooLarge:
        raise TooLarge from None
    except decode.DecodeError as e:
        raise Unparseable(e.reason, e.status) from None
    return raw if got is None else got.data


def _shared_doc(flow: Any, part: str, data: bytes, limit: int,
                memo_key: str | None = None) -> Any:
    """The flow's one JSON parse of `data` (addons/frame/decode.py: policy, sessions and
    approval read the same one), when it is exactly what masking would parse, else None.
    Masking never changes it (bodies: copy on write)."""
    msg = getattr(flow, part, None) if flow is not None else None
    if msg is None:
        return None
    try:
        if part == "request":
            body = decode.request_body(flow, max_bytes=limit, memo_key=memo_key)
        else:
            body = decode.response_body(flow, max_bytes=limit)
    except decode.DecodeError:
        return None  # masking decodes it itself and answers with its own error
    if body is None or body.data is not data:
        return None
    return shared_json(body)


LOOP_BUDGET_US = cost.LOOP_BUDGET_US
_cost = cost.estimate
_heavy = cost.heavy


def _on_loop(ctx: Masked, flow: Any, raw: bytes) -> bool:
    """Is masking the request body `raw` (not compressed) small work, for the loop: a small
    body that is not heavy, or one that continues the session's previous body (_continues)
    by a part that is not heavy."""
    if len(raw) < THREAD_MIN_BYTES and not _heavy(raw):
        return True
    return _continues(ctx, flow, raw)


def _continues(ctx: Masked, flow: Any, raw: bytes) -> bool:
    """Is masking `raw` small work: the flow's parse (policy's, with the session's memo)
    took all but at most INLINE_NEW_CHARS of it from the session's previous body, that
    new part is not heavy, and this session's cache holds that body's messages as masked?
    Looks only; anything else: no (a worker thread masks it, as any large body)."""
    cache = ctx.cache
    if cache is None or len(raw) > INLINE_MAX_BYTES:
        return False
    body = decode.parsed_request(flow, raw)
    if body is None or not (0 <= body.new_chars <= INLINE_NEW_CHARS and body.reused > 0) or \
            not cache.has_prefix(body.reused_from, body.reused, ctx.restorable, ctx.llm):
        return False
    # the new part is the end of the body's text (decode.parse_memo)
    try:
        new = body.text[len(body.text) - body.new_chars:]
    except decode.DecodeError:
        return False
    if _heavy(new.encode("utf-8", "surrogatepass")):
        return False
    # ... taken from the list masking masks (with both "input" and "messages" in a body
    # the memo may have continued the other one: then nothing is taken whole)
    try:
        doc = body.json
    except decode.DecodeError:
        return False
    if not isinstance(doc, dict):
        return False
    key = _message_list_key(doc)
    ctx.list_key = (doc, key)  # asked again of the same parse when masked (bodies)
    return key == body.memo_list


def mask_message(ctx: Masked, raw: bytes, encoding: str, content_type: str, limit: int,
                 pass_text: bool, flow: Any = None, memo_key: str | None = None
                 ) -> bytes | None:
    """Decoded, masked body, or None when nothing changed. Raises Unparseable/TooLarge.
    `memo_key`: the session's key, for the flow's JSON parse when no step parsed it yet
    (policy does, with the same key, when a rule reads the body)."""
    if len(raw) > limit:
        raise TooLarge
    data = _decoded(flow, "request", raw, encoding, limit) if encoding else raw
    doc = _shared_doc(flow, "request", data, limit,
                      memo_key if ctx.cache is not None else None)
    if doc is not None and ctx.cache is not None:
        # which messages the flow's parse took whole from the session's previous body
        # (policy parsed it with the session's memo key: decode.parse_memo)
        body = decode.request_body(flow, max_bytes=limit)
        if body is not None and body.generation and body.json is doc:
            ctx.reuse = (body.generation, body.reused, body.reused_from, body.memo_list)
    return ctx.body(data, content_type, pass_text, doc=doc)


def mask_response(ctx: Masked, raw: bytes, encoding: str, content_type: str, limit: int,
                  pass_text: bool, restore: bool, flow: Any = None
                  ) -> tuple[bytes | None, bytes | None]:
    """(decoded body for the agent, or None when unchanged; the masked body to record
    instead, or None when the agent gets the masked body itself).

    Masks first, then (with `restore`) puts this session's originals back in a second,
    detection-free pass over the masked body: the masked body is what the upstream's
    answer looks like with no raw value in it, and it is what the audit store keeps.
    Raises Unparseable/TooLarge."""
    if len(raw) > limit:
        raise TooLarge
    data = _decoded(flow, "response", raw, encoding, limit) if encoding else raw
    doc = _shared_doc(flow, "response", data, limit)
    masked = ctx.body(data, content_type, pass_text, doc=doc)
    if not restore:
        return masked, None
    base = data if masked is None else masked
    if b"[" not in base:  # every placeholder starts with "["
        return masked, None
    restored = ctx.variant(restore=True, detect=False).body(
        base, content_type, pass_text, doc=doc if masked is None else None)
    if restored is None or restored == base:
        return masked, None
    return restored, base


class Masking:
    def __init__(self, holder: RulesHolder) -> None:
        self.holder = holder
        self.sessions = SessionStore()
        self._masker: Masker | None = None
        self._masker_cfg: Any = None
        self._flow_sessions: weakref.WeakKeyDictionary[http.HTTPFlow, Session] = \
            weakref.WeakKeyDictionary()
        # per session: the request messages already masked (bodies.MessageCache), so a turn
        # that re-sends the history costs only its new messages; keyed like the sessions
        self.message_caches = MessageCaches(max_sessions=self.sessions.max_sessions,
                                            idle_ttl=self.sessions.idle_ttl,
                                            max_bytes_per_session=MESSAGE_CACHE_SESSION_BYTES,
                                            max_bytes=MESSAGE_CACHE_BYTES)
        # AGENTGATE_STATE / state: set: the placeholder map is shared by the replicas
        # (sessionstore.py)
        self.shared: Any = None
        self.shared_error: str | None = None
        # the masker of new rules, built in a worker thread as soon as they are installed
        # (compiling the detectors takes a few hundred ms: not on the event loop, not in
        # the first flow after a start or a reload): (masking config, future)
        self._warming: tuple[Any, asyncio.Future[Masker]] | None = None
        holder.on_change(self._rules_changed)
        # heavy streamed chunks masked off the event loop (streamwork.py); when it cannot
        # be installed they stay on the loop
        install()

    def _rules_changed(self, rules: Any) -> None:
        cfg = getattr(rules, "masking", None)
        if cfg is None or cfg is self._masker_cfg or not getattr(cfg, "enabled", True):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a command, a test): built on first use
        self._warming = (cfg, loop.run_in_executor(None, self._build, cfg))

    def _build(self, cfg: Any) -> Masker:
        from addons.masking.detectors import DetectorSet  # the detector engine (other module)
        key = cfg.hmac_key() if hasattr(cfg, "hmac_key") else None
        if key is None and getattr(cfg, "hmac_key_env", None):
            log.warning("masking: %s is not set; the hash strategy uses a random key "
                        "for this process only", cfg.hmac_key_env)
        return Masker(DetectorSet(cfg), key or _PROCESS_KEY, self.sessions)

    async def _ready_masker(self) -> Masker:
        """The masker of the rules in force, waiting (not blocking) for its build."""
        rules = self.holder.rules
        warming = self._warming
        if rules is not None and warming is not None and warming[0] is rules.masking \
                and self._masker_cfg is not rules.masking:
            await asyncio.shield(warming[1])
        return self.masker()

    def running(self) -> None:
        try:
            self.shared = shared_from_env(self.sessions.idle_ttl, rules_state=getattr(
                self.holder.rules, "state", None))
        except SecretMissing as e:
            # still masked, in memory: only restoring across replicas needs the secret
            log.warning("agentgate: a state database is set but placeholders stay in this "
                        "replica's memory: %s", e)
        except Exception as e:  # noqa: BLE001 - fail closed: an error logged at start stops
            # mitmproxy; should it go on, every masked flow is refused (_session raises)
            self.shared_error = (f"masking session store unavailable: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''}")
            log.error("agentgate: %s; masked flows will be refused", self.shared_error)

    def done(self) -> None:
        if self.shared is not None:
            self.shared.close()

    # -- configuration
    def masker(self) -> Masker:
        """The masker of the rules in force (rebuilt when the masking section changes)."""
        rules = self.holder.rules
        assert rules is not None  # RulesLoader refuses flows before rules exist
        cfg = rules.masking
        if self._masker is None or self._masker_cfg is not cfg:
            warming = self._warming
            fut = warming[1] if warming is not None and warming[0] is cfg else None
            if fut is not None and fut.done() and not fut.cancelled() \
                    and fut.exception() is None:
                self._masker = fut.result()
            else:  # not warmed (yet): built here, as it always could be
                self._masker = self._build(cfg)
            self._masker_cfg = cfg
            # the loop-or-thread estimate counts these rules' custom detectors too
            cost.use_custom(getattr(cfg, "custom", ()))
            self._warming = None
        return self._masker

    def _plan(self, flow: http.HTTPFlow) -> tuple[Any, Any] | None:
        """(masking config, upstream) when masking applies to this flow, else None."""
        rules = self.holder.rules
        if rules is None:
            raise RuntimeError("no rules")
        cfg = rules.masking
        if not getattr(cfg, "enabled", True):
            return None
        meta = flow.metadata.get("upstream")
        up = rules.upstream_named(meta.get("name")) if isinstance(meta, dict) else None
        if up is not None and not up.mask:
            return None
        return cfg, up  # an unresolved upstream is masked too (fail closed)

    @staticmethod
    def _session_key(flow: http.HTTPFlow) -> str:
        return flow_session_key(flow)

    def _session(self, flow: http.HTTPFlow) -> Session:
        s = self._flow_sessions.get(flow)
        if s is not None:
            return s
        if self.shared_error:
            raise RuntimeError(self.shared_error)
        if self.shared is not None:
            s = SharedSession(self.shared, self._session_key(flow))
        else:
            s = self.sessions.get(self._session_key(flow))
        self._flow_sessions[flow] = s
        return s

    def _message_cache(self, flow: http.HTTPFlow, session: Session, masker: Masker
                       ) -> MessageCache | None:
        """This session's message cache (in-memory sessions only: a replica-shared map may
        number a value on another replica, so its placeholders are not replayed here)."""
        if isinstance(session, SharedSession):
            return None
        return self.message_caches.get(self._session_key(flow), session, masker)

    @staticmethod
    def _dialect(flow: http.HTTPFlow, up: Any) -> str:
        return up.dialect if up is not None else "generic"

    @staticmethod
    def _findings(flow: http.HTTPFlow) -> dict:
        f = flow.metadata.get("findings")
        if not isinstance(f, dict):
            f = flow.metadata["findings"] = {}
        return f

    # -- requests
    @guarded("masking")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        plan = self._plan(flow)
        if plan is None:
            return
        cfg, _ = plan
        cl = flow.request.headers.get("content-length", "")
        if cl.strip().isdigit() and int(cl) > cfg.max_body_bytes:
            refuse(flow, 413, f"request body over masking.max_body_bytes "
                   f"({cfg.max_body_bytes} bytes) cannot be masked", "body_too_large", "masking")
        elif flow.request.stream:
            refuse(flow, 413, "a streamed request body cannot be masked", "body_too_large",
                   "masking")
        if flow.response is not None:
            # mitmproxy cannot answer and stream the request at once (stream_large_bodies)
            flow.request.stream = False

    @guarded("masking")
    async def request(self, flow: http.HTTPFlow) -> None:
        plan = self._plan(flow)
        if plan is None:
            return
        cfg, up = plan
        masker = await self._ready_masker()
        found: dict = {}
        session = self._session(flow)
        ctx = Masked(masker, session, found, restorable=True,
                     dialect=self._dialect(flow, up),
                     cache=self._message_cache(flow, session, masker))
        req = flow.request
        shared = isinstance(session, SharedSession)
        if shared:  # Postgres round trips: in a worker thread, the flow waits in this hook
            await asyncio.to_thread(session.prefetch)
            await asyncio.to_thread(_mask_url_and_headers, ctx, req, cfg)
            await asyncio.to_thread(_mask_recorded_origin, ctx, flow)
        else:
            _mask_url_and_headers(ctx, req, cfg)
            _mask_recorded_origin(ctx, flow)
        raw = req.raw_content
        if raw is None:
            refuse(flow, 413, "a streamed request body cannot be masked", "body_too_large",
                   "masking")
            return
        if raw:
            encoding, ctype = decode.coding_and_type(req.headers)
            args = (ctx, raw, encoding, ctype, cfg.max_body_bytes,
                    cfg.on_unparseable == "pass_text")
            try:
                key = None if shared else self._session_key(flow)
                # a compressed body's size on the wire says nothing of its decoded size
                # (up to decode.MAX_RATIO times it): always a thread, as policy does
                if encoding or not _on_loop(ctx, flow, raw):
                    # in this identity's share of the worker threads (frame/offload.py)
                    new = await run_heavy(flow, mask_message, *args, flow=flow,
                                          memo_key=key)
                elif shared:
                    # small work, but the replica-shared map's round trips: a thread of
                    # its own (I/O-bound: it must not hold a heavy-work slot while waiting)
                    new = await asyncio.to_thread(mask_message, *args, flow=flow,
                                                  memo_key=key)
                else:
                    new = mask_message(*args, flow=flow, memo_key=key)
            except Busy as e:
                refuse(flow, e.status, e.message, "busy", "masking",
                       headers={"retry-after": "1"})
                return
            except TooLarge:
                refuse(flow, 413, f"request body over masking.max_body_bytes "
                       f"({cfg.max_body_bytes} bytes, decoded) cannot be masked",
                       "body_too_large", "masking")
                return
            except Unparseable as e:
                refuse(flow, e.status, f"request body cannot be masked: {e.reason}",
                       "unmaskable_body", "masking")
                return
            if new is not None:
                set_plain_body(req, new)
        if found:
            merge(self._findings(flow), found)

    # -- responses
    @guarded("masking")
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or "refusal" in flow.metadata:
            return
        sse = resp.headers.get("content-type", "").lower().startswith("text/event-stream")
        plan = self._plan(flow)
        if plan is None:
            if sse and not callable(resp.stream):
                resp.stream = True  # unmasked, but never buffered whole (time to first token)
            return
        cfg, up = plan
        if _unpassed(resp.headers, cfg.headers_pass):
            hfound: dict = {}
            masker = self.masker()
            session = self._session(flow)
            # with the session's cache: a set of response header fields this session was
            # answered with before, nothing found in it, is not scanned again (an upstream
            # sends the same server, cache and rate headers on every answer; header_fields)
            hctx = Masked(masker, session, hfound, restorable=False,
                          dialect=self._dialect(flow, up),
                          cache=self._message_cache(flow, session, masker))
            new_fields = _masked_fields(hctx, resp.headers, cfg.headers_pass)
            if new_fields is not None:
                resp.headers.fields = new_fields
            if hfound:
                merge(self._findings(flow), hfound)
        if not sse:
            cl = resp.headers.get("content-length", "")
            if resp.stream or (cl.strip().isdigit() and int(cl) > cfg.max_body_bytes):
                # mitmproxy would stream it (stream_large_bodies) or it is over the limit:
                # it cannot be masked whole, and it must not pass unmasked.
                _refuse_stream(flow, "upstream response over masking.max_body_bytes cannot "
                               "be masked", "body_too_large")
            return
        enc = resp.headers.get("content-encoding", "")
        try:
            decoder = StreamDecoder(enc) if enc else None
        except Unparseable as e:
            _refuse_stream(flow, f"response stream cannot be masked: {e.reason}",
                           "unmaskable_body")
            return
        found = flow.metadata.get("findings")
        if not isinstance(found, dict):
            found = {}  # put in flow.metadata by the stream once something is found
        ctx = Masked(self.masker(), self._session(flow), found,
                     restorable=False, restore=bool(up and up.restore),
                     dialect=self._dialect(flow, up))
        masker = StreamMasker(ctx, max_event=cfg.max_body_bytes, decoder=decoder,
                              max_masked_copy=cfg.max_body_bytes)
        # an earlier step's stream function (the mcp addon judging each JSON-RPC event)
        # runs first; its output is what gets masked
        before = resp.stream if callable(resp.stream) else None
        resp.stream = _SafeStream(masker, flow, found, before)
        # The body changes length and is sent decoded.
        resp.headers.pop("content-encoding", None)
        if "content-length" in resp.headers:
            del resp.headers["content-length"]
            if flow.request.http_version == "HTTP/1.1":  # the client side's framing
                resp.headers["transfer-encoding"] = "chunked"

    @guarded("masking")
    async def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or resp.stream or "refusal" in flow.metadata:
            return  # streamed (masked on the fly) or our own error answer
        plan = self._plan(flow)
        if plan is None:
            return
        cfg, up = plan
        raw = resp.raw_content
        if not raw:
            return
        found: dict = {}
        session = self._session(flow)
        ctx = Masked(self.masker(), session, found, restorable=False,
                     dialect=self._dialect(flow, up))
        encoding, ctype = decode.coding_and_type(resp.headers)
        args = (ctx, raw, encoding, ctype, cfg.max_body_bytes,
                cfg.on_unparseable == "pass_text", bool(up and up.restore))
        # compressed, it may decode to decode.MAX_RATIO times its size on the wire (an
        # upstream may compress whatever the request asked for: a hostile MCP server)
        size = len(raw) * decode.MAX_RATIO if encoding else len(raw)
        try:
            if size >= THREAD_MIN_BYTES or _heavy(raw):
                new, masked = await run_heavy(flow, mask_response, *args, flow=flow)
            elif isinstance(session, SharedSession):  # I/O-bound (see request)
                new, masked = await asyncio.to_thread(mask_response, *args, flow=flow)
            else:
                new, masked = mask_response(*args, flow=flow)
        except Busy as e:
            refuse(flow, e.status, f"upstream response cannot be masked now: {e.message}",
                   "busy", "masking", headers={"retry-after": "1"})
            return
        except TooLarge:
            refuse(flow, 502, "upstream response over masking.max_body_bytes cannot be masked",
                   "body_too_large", "masking")
            return
        except Unparseable as e:
            refuse(flow, 502, f"upstream response cannot be masked: {e.reason}",
                   "unmaskable_body", "masking")
            return
        if masked is not None:
            # restore: the agent gets its originals back; the recorder stores this instead
            flow.metadata["masked_response"] = masked
        if new is not None:
            set_plain_body(resp, new)
        if found:
            merge(self._findings(flow), found)


    async def agentgate_stream_work(self, job: StreamJob) -> None:
        """streamwork.StreamWorkHook: a heavy streamed chunk, masked in a worker thread (in
        the identity's share: frame/offload) while reading from its upstream is paused, so
        what arrives meanwhile waits in the kernel, not in memory. Without a transport to
        pause, the layer's call masks it on the loop (as before). Never raises: an error
        goes back to the layer's call in the job (the stream aborts)."""
        if job.done:
            return
        try:
            transport = upstream_transport(job.flow, ctx.master.addons.get("proxyserver"))
            if transport is None:
                return
            transport.pause_reading()
        except Exception as e:  # noqa: BLE001 - the work stays on the loop
            log.debug("masking: stream chunk masked on the loop (%s)", type(e).__name__)
            return
        try:
            await run_heavy(job.flow, job.run)
        except Busy as e:
            log.warning("masking: stream aborted: %s", e.message)
            job.error, job.done = RuntimeError("masking failed; stream aborted"), True
        except BaseException:
            job.error, job.done = RuntimeError("masking failed; stream aborted"), True
            raise
        finally:
            try:
                transport.resume_reading()
            except Exception:  # noqa: BLE001, S110 - the connection is gone
                pass


def set_plain_body(msg: http.Message, data: bytes) -> None:
    """Exactly `msg.headers.pop("content-encoding", None); msg.content = data` (mitmproxy's
    set_content with no encoding left: the bytes as they are, Content-Length set as
    Headers.set_all sets it unless a Transfer-Encoding is there), in one pass over the
    header fields: the two calls scanned them four times (a KeyError raised inside each
    absent-name look-up), on every masked body."""
    out: list[tuple[bytes, bytes]] = []
    chunked = False
    length = -1  # where the first Content-Length field is kept
    for field in msg.headers.fields:
        name = field[0].lower()
        if name == b"content-encoding":
            continue
        if name == b"content-length":
            if length < 0:
                length = len(out)
                out.append(field)
            continue  # later ones: set_all keeps one
        if name == b"transfer-encoding":
            chunked = True
        out.append(field)
    if chunked:  # Content-Length left as it was (all of its fields)
        out = [f for f in msg.headers.fields if f[0].lower() != b"content-encoding"]
    else:
        value = str(len(data)).encode()
        if length < 0:
            out.append((b"content-length", value))
        else:
            out[length] = (out[length][0], value)
    msg.headers.fields = tuple(out)
    msg.raw_content = data


def _unpassed(headers: http.Headers, passed: frozenset[str]) -> bool:
    """Is a header field not in `passed` (one header_fields would look at)? With none (a
    response of only framing headers: server, date, content-type, ...) there is nothing
    to mask, and no context, session cache or detector pass is set up for it."""
    return any(k.decode("latin-1").lower() not in passed for k, _ in headers.fields)


def _masked_fields(ctx: Masked, headers: http.Headers, passed: frozenset[str]
                   ) -> tuple[tuple[bytes, bytes], ...] | None:
    """The header fields masked (bytes, for `Headers.fields`), or None when unchanged."""
    fields = [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
              for k, v in headers.fields]
    new = ctx.header_fields(fields, passed)
    if new is None:
        return None
    return tuple((k.encode("latin-1"), v.encode("utf-8", "surrogateescape")) for k, v in new)


def _mask_url_and_headers(ctx: Masked, req: http.Request, cfg: Any) -> None:
    """Mask the path segments, the query and the headers of a request in place."""
    path, sep, _ = req.path.partition("?")
    if req.method != "CONNECT" and path.startswith("/"):
        new_path = ctx.url_path(path)
        if new_path is not None:
            req.path = new_path + req.path[len(path):]
    if sep:
        pairs = ctx.pairs(list(req.query.items(multi=True)))
        if pairs is not None:
            req.query = pairs
    new_fields = _masked_fields(ctx, req.headers, cfg.headers_pass)
    if new_fields is not None:
        req.headers.fields = new_fields


def _mask_recorded_origin(ctx: Masked, flow: http.HTTPFlow) -> None:
    """The recorder keeps the URL the agent asked for (`metadata["recorder"]["origin"]`,
    taken at requestheaders, before this step, with token parameters already redacted):
    mask its path and query the same way (same session, same placeholders), so the
    record holds no value the upstream did not get. Findings are not counted twice."""
    rec = flow.metadata.get("recorder")
    origin = rec.get("origin") if isinstance(rec, dict) else None
    if not isinstance(origin, str):
        return
    quiet = Masked(ctx.masker, ctx.session, {}, restorable=ctx.restorable)
    parts = urlsplit(origin)
    path = quiet.url_path(parts.path) if parts.path.startswith("/") else None
    query = None
    if parts.query:
        pairs = quiet.pairs(parse_qsl(parts.query, keep_blank_values=True))
        if pairs is not None:
            query = urlencode(pairs)
    if path is not None or query is not None:
        rec["origin"] = urlunsplit((parts.scheme, parts.netloc,
                                    parts.path if path is None else path,
                                    parts.query if query is None else query, parts.fragment))


class _SafeStream:
    """The stream callable: masks each chunk, keeps the flow's findings up to date, and
    aborts the stream (fail closed) if masking a chunk fails; never passes it unmasked.
    `before`: an earlier stream function whose output is masked (it raises to abort).

    Heavy work leaves the event loop (streamwork.py): the HTTP layer first calls
    `agentgate_offload(data)`, which runs `before` (on the loop: its state is the loop's)
    and adds up the estimated masking work (_cost) of the chunks since no event was
    pending; over LOOP_BUDGET_US (a compressed stream: always, its decoded size is not
    known) it returns the masking as a job for a worker thread. The layer's call with the
    same chunk then hands back what the job computed. Same calls to the masker, in the
    same order, either way."""

    def __init__(self, masker: StreamMasker, flow: http.HTTPFlow, found: dict,
                 before: Any = None) -> None:
        self.masker = masker
        self.flow = flow
        self.found = found
        self.before = before
        self._ready: tuple[bytes, StreamJob] | None = None
        self._cost = 0  # estimated us of masking work held in the masker (events pending)

    def _chunk(self, data: bytes) -> bytes:
        got = self.before(data)
        return b"".join(got) if isinstance(got, list) else got

    def _mask(self, data: bytes, chunk: bytes) -> list[bytes] | bytes:
        masker = self.masker
        try:
            if self.before is None:
                return masker(data)
            out = masker(chunk) if chunk else []
            if data == b"":  # the end: flush what the masker still holds
                end = masker(b"")
                out = [*(out if isinstance(out, list) else [out]),
                       *(end if isinstance(end, list) else [end])]
            return out
        except Exception as e:  # noqa: BLE001 - fail closed: abort, never pass unmasked
            # The type only: an exception text could quote the stream's content.
            log.error("masking: stream aborted (%s)", type(e).__name__)
            raise RuntimeError("masking failed; stream aborted") from None

    def agentgate_offload(self, data: bytes) -> StreamJob | None:
        """The layer asks before its call with `data`: a job for a worker thread when the
        masking work is heavy, else None (the call does it, on the loop)."""
        self._ready = None
        job = StreamJob(self.flow, _nothing)
        if self.before is not None:
            before_heavy = getattr(self.before, "agentgate_heavy", None)
            if before_heavy is not None and before_heavy(data):
                # the earlier stream function's own work is heavy (the mcp addon parsing
                # and judging a large event): it runs in the job too, then the masking
                job.work = lambda: self._mask(data, self._chunk(data))
                self._ready = (data, job)
                return job
            try:
                chunk = self._chunk(data)
            except BaseException as e:  # noqa: BLE001 - raised by the layer's call
                job.error, job.done = e, True
                self._ready = (data, job)
                return None
        else:
            chunk = data
        job.work = lambda: self._mask(data, chunk)
        self._ready = (data, job)
        self._cost += _cost(chunk)
        if self.masker.decoder is None and self._cost <= cost.LOOP_BUDGET_US:
            return None
        return job

    def __call__(self, data: bytes) -> list[bytes] | bytes:
        job = take_ready(self, data)
        if job is not None:
            if job.error is not None:
                raise job.error
            out = job.result
        else:  # the layer called without asking first (streamwork not installed)
            out = self._mask(data, self._chunk(data) if self.before is not None else data)
        splitter = self.masker.splitter
        if not splitter.buf and not splitter.lines:
            self._cost = 0  # no event pending: the estimate starts again
        flow, found = self.flow, self.found
        if found and flow.metadata.get("findings") is not found:
            flow.metadata["findings"] = found
        if data == b"" and self.masker.restored:
            # restore: the agent got its originals back; the recorder stores the masked
            # stream instead (set before mitmproxy's response hook, which follows the end)
            flow.metadata["masked_response"] = self.masker.masked_copy()
        return out


def _nothing() -> None:
    return None


def _refuse_stream(flow: http.HTTPFlow, message: str, code: str) -> None:
    """Refuse at responseheaders time: answer with an error and swallow the upstream body
    (streamed away chunk by chunk, never buffered)."""
    refuse(flow, 502, message, code, "masking")
    assert flow.response is not None
    body = flow.response.content or b""
    sent = [False]

    def swallow(data: bytes) -> list[bytes] | bytes:
        if data == b"" and not sent[0]:
            sent[0] = True
            return [body]
        return []

    flow.response.stream = swallow

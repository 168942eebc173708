"""The approval addon: hold risky requests until reviewers decide.

When the policy addon decides `approve` (flow.metadata["decision"]), the `request` hook
opens an approval in the store, intercepts the flow (mitmweb shows it held, with a
comment naming the rule), announces it to the notification webhook and then *awaits*
the decision, with the rule's timeout. Awaiting inside the hook suspends only this
flow's hook task: the event loop, and every other flow, go on. The addons after this one
(credentials, …) run only once the flow is released.

Outcomes, recorded in flow.metadata["approval"] for the recorder:
  approved  -> resume, the request goes upstream
  denied    -> 403 `approval_denied` in the caller's dialect, naming the rule and reason
  timeout   -> 403 (or 408, `approvals.timeout_status`) `approval_timeout`, or the request
               goes on when the rule says `on_timeout: allow`
  cancelled -> the client went away, the operator killed the flow or the gateway stops
The flow is always answered and resumed, never killed: `flow.kill()` on an intercepted
flow hangs the client in mitmproxy 12.

One hold per intent: a request that repeats a pending one (same identity, upstream, method,
URL, masked body and rule: an SDK retrying after its own timeout) joins that hold instead of
opening another, so reviewers get one notification and one approval id, and every joined
request gets the decision. A client that goes away leaves the hold open for
`approvals.retry_grace` seconds (its retry joins it); with nobody waiting after that, the
hold is cancelled.

mitmweb: mitmweb's selection is not the gateway's `@focus` (the UI never tells the server
which flow is selected), so the commands take what the flow's comment shows:
`agentgate.approve ap-… ["reason"]` / `agentgate.deny ap-… "reason"`, or a flow id
(`@<flow id>`, as in the flow's URL), or any flow spec (`@focus` in mitmproxy's console).
The operator's approval (and a plain "resume" click) counts as one vote of the reviewer
"mitmweb-operator" only when the rule allows it (`allow_mitmweb`); otherwise a resume is
ignored: the flow is intercepted again and stays held (the comment says why). The
operator may always deny. Marks say the outcome: ⌛ held, ✅ approved (🔒 kept when the
request was masked), 🚫 denied, ⏰ timed out, ✖️ cancelled; a policy block stays ⛔.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from mitmproxy import command, connection, ctx, exceptions, flow, hooks, http

from addons.approval.api import ApprovalsAPI, AuthError
from addons.approval.config import (
    LISTEN_ENV,
    ApprovalsConfig,
    bind_reason,
    listen_text,
    parse_listen,
    url_for,
)
from addons.approval.notify import SHUTDOWN_GRACE, Notifier, Retry, event
from addons.approval.pgstore import STATE_ENV, PgApprovalStore, state_store
from addons.approval.slack import SlackActionsHandler, SlackInteractions, SlackMessenger
from addons.approval.store import (
    APPROVED,
    CANCELLED,
    DENIED,
    OPERATOR,
    PENDING,
    TIMEOUT,
    VIA_MITMWEB,
    ApprovalError,
    ApprovalSpec,
    ApprovalStore,
    PendingApproval,
)
from addons.config.holder import RulesHolder
from addons.frame import decode
from addons.frame.guard import guarded, refuse

log = logging.getLogger("agentgate.approval")

STEP = "approval"
# Held flows wake up this often to notice what mitmproxy does not signal (an operator's
# kill sets no event); 200 held flows cost 200 cheap wake-ups a second.
POLL_SECONDS = 1.0
# a bigger JSON body is not parsed for the model / tool / summary (the preview still shows it)
SCAN_BYTES = 2 * 1024 * 1024
SUMMARY_CHARS = 160
DECIDED_PREVIEW_CHARS = 16 * 1024
HASH_INLINE_BYTES = 64 * 1024  # bodies above this are hashed in a worker thread
MARKS = {APPROVED: ":white_check_mark:", DENIED: ":no_entry_sign:", TIMEOUT: ":alarm_clock:",
         CANCELLED: ":heavy_multiplication_x:"}
HELD_MARK = ":hourglass:"


def spec_from_decision(dec: dict[str, Any], cfg: ApprovalsConfig) -> ApprovalSpec:
    """The approval the rule asks for; a missing timeout / on_timeout comes from the
    `approvals` section, and mitmweb approval needs both the rule and the section to allow it.

    Raises ValueError on a malformed decision (the guard then refuses the flow: fail closed).
    """
    ap = dec.get("approval") or {}
    if not isinstance(ap, dict):
        raise ValueError("decision.approval must be a mapping")
    groups = ap.get("groups") or []
    if isinstance(groups, str):
        groups = [groups]
    if not isinstance(groups, list | tuple) or not all(isinstance(g, str) for g in groups):
        raise ValueError("decision.approval.groups must be a list of strings")
    n = ap.get("min_approvals")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError("decision.approval.min_approvals must be a whole number >= 1")
    timeout = ap.get("timeout")
    timeout = cfg.default_timeout if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError("decision.approval.timeout must be a positive number")
    on_timeout = ap.get("on_timeout") or cfg.on_timeout
    if on_timeout not in ("deny", "allow"):
        raise ValueError("decision.approval.on_timeout must be deny or allow")
    allow_mitmweb = ap.get("allow_mitmweb")
    allow_mitmweb = False if allow_mitmweb is None else allow_mitmweb
    if not isinstance(allow_mitmweb, bool):
        raise ValueError("decision.approval.allow_mitmweb must be true or false")
    # `approvals.allow_mitmweb: false` is the security team's master switch over every rule
    allow_mitmweb = allow_mitmweb and cfg.allow_mitmweb
    rule = dec.get("rule")
    return ApprovalSpec(rule=rule if isinstance(rule, str) and rule else "(unnamed rule)",
                        groups=tuple(groups), min_approvals=n, timeout=float(timeout),
                        on_timeout=on_timeout, allow_mitmweb=allow_mitmweb,
                        message=str(dec.get("message") or ""))


def owner_of(f: http.HTTPFlow) -> str:
    """Whose per-identity approval quota a hold counts against: the verified issuer and
    subject; without identity (identity.required: false) the client's address, so agents
    on different hosts still get a quota each."""
    ident = f.metadata.get("identity")
    if isinstance(ident, dict) and isinstance(ident.get("sub"), str) and ident["sub"]:
        return f"id:{ident.get('iss') or ''}|{ident['sub']}"
    peer = f.client_conn.peername
    return f"client:{peer[0] if peer else '?'}"


KINDS_BY_DIALECT = {"openai": "llm", "anthropic": "llm", "mcp": "tool", "webhook": "webhook"}


def kind_of(f: http.HTTPFlow) -> str:
    """What reviewers are asked about: llm | tool | webhook | http (a database hold, which
    is no HTTP flow, says `sql` itself)."""
    up = f.metadata.get("upstream")
    dialect = up.get("dialect") if isinstance(up, dict) else None
    return KINDS_BY_DIALECT.get(dialect, "http") if isinstance(dialect, str) else "http"


def _text_of(content: Any) -> str:
    """The text of a chat message's content (a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _one_line(text: str, limit: int = SUMMARY_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(kind: str, doc: Any, f: http.HTTPFlow) -> dict[str, Any]:
    """model / tool / summary of a (masked) JSON body, for reviewers' lists and chat."""
    out: dict[str, Any] = {}
    if not isinstance(doc, dict):
        return out
    if isinstance(doc.get("model"), str):
        out["model"] = doc["model"][:200]
    if kind == "tool" or doc.get("jsonrpc") == "2.0":
        method = doc.get("method")
        params = doc.get("params") if isinstance(doc.get("params"), dict) else {}
        if method == "tools/call" and isinstance(params.get("name"), str):
            out["tool"] = params["name"][:200]
            args = params.get("arguments")
            names = ", ".join(sorted(args)) if isinstance(args, dict) else ""
            out["summary"] = _one_line(f"tools/call {out['tool']}({names})")
        elif isinstance(method, str):
            out["summary"] = _one_line(method)
        return out
    messages = doc.get("messages")
    if isinstance(messages, list):
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        last = users[-1] if users else (messages[-1] if messages else None)
        if isinstance(last, dict):
            out["summary"] = _one_line(_text_of(last.get("content")))
    elif isinstance(doc.get("input"), str | list):  # the Responses API
        inp = doc["input"]
        if isinstance(inp, list):
            users = [m for m in inp if isinstance(m, dict) and m.get("role") == "user"]
            inp = _text_of(users[-1].get("content")) if users else ""
        out["summary"] = _one_line(inp)
    elif isinstance(doc.get("prompt"), str):
        out["summary"] = _one_line(doc["prompt"])
    return out


def describe_request(f: http.HTTPFlow, preview_bytes: int) -> tuple[dict[str, Any], str, bool]:
    """(what, preview, truncated) of a request, for reviewers: the whole masked body up to
    `preview_bytes` (the masking addon runs first), and in `what` the kind, model, tool and a
    one-line summary so that holds are told apart in lists and notifications. The query
    string is left out (it may hold keys)."""
    req = f.request
    up = f.metadata.get("upstream")
    kind = kind_of(f)
    what: dict[str, Any] = {
        "method": req.method,
        "url": f"{req.scheme}://{req.pretty_host}"
               + (f":{req.port}" if req.port not in (80, 443) else "") + req.path.split("?")[0],
        "host": req.pretty_host,
        "path": req.path.split("?")[0],
        "upstream": up.get("name") if isinstance(up, dict) else None,
        "model": None,
        "tool": None,
        "summary": f"{req.method} {req.path.split('?')[0]}",
        "body_bytes": len(req.raw_content or b""),
        "kind": kind,
        "session": f.metadata.get("session") if isinstance(f.metadata.get("session"), str)
        else None,
    }
    doc = None
    try:  # the one bounded decoder: `get_content` inflates without any limit
        body = decode.request_body(f)
        raw = body.data if body is not None else b""
        if body is not None and len(raw) <= SCAN_BYTES:
            doc = body.json  # parsed once per flow (policy read it already)
    except decode.DecodeError:
        raw = b""
    what.update(summarize(kind, doc, f))
    # what the masking step replaced, by entity: counts only, never a value
    found = f.metadata.get("findings")
    what["findings"] = {str(k): v["count"] for k, v in found.items()
                        if isinstance(v, dict) and isinstance(v.get("count"), int)
                        } if isinstance(found, dict) else {}
    mcp = f.metadata.get("mcp")
    if isinstance(mcp, dict) and isinstance(mcp.get("tool"), str) and not what["tool"]:
        what["tool"] = mcp["tool"]
    truncated = len(raw) > preview_bytes
    # cut on a character boundary: a split UTF-8 sequence would show as garbage
    preview = raw[:preview_bytes].decode("utf-8", errors="ignore" if truncated else "replace")
    return what, preview, truncated


def intent_key(f: http.HTTPFlow, spec: ApprovalSpec) -> str:
    """Who asks what of whom under which rule: a retry of a held request has the same key."""
    up = f.metadata.get("upstream")
    h = hashlib.sha256()
    for part in (owner_of(f), up.get("name") if isinstance(up, dict) else "",
                 f.request.method, f.request.pretty_url, spec.rule):
        h.update(str(part).encode("utf-8", "replace") + b"\0")
    h.update(f.request.raw_content or b"")
    return h.hexdigest()


def _under_mitmweb() -> bool:
    try:
        from mitmproxy.tools.web.master import WebMaster
    except ImportError:  # pragma: no cover - mitmweb is part of mitmproxy
        return False
    return isinstance(getattr(ctx, "master", None), WebMaster)


class Approval:
    def __init__(self, holder: RulesHolder, store: ApprovalStore | None = None,
                 verify: Callable[[str], Awaitable[dict[str, Any]]] | None = None) -> None:
        self.holder = holder
        # AGENTGATE_STATE=postgresql://… shares the holds with every replica (pgstore.py);
        # unset, they live in this process. A bad value is reported by configure().
        self._state_error = ""
        self._state_reported = False
        self._state_cfg: Any = None
        self._refuse_holds = False  # `state:` configured but unusable: fail closed
        if store is None:
            try:
                store = state_store()
            except ValueError as e:
                self._state_error = str(e)
                # whatever happens next, holds are never kept in this process instead of
                # the shared store that was asked for
                self._refuse_holds = True
        self.store = store if store is not None else ApprovalStore()
        self.store.on_decided = self._on_decided
        self._verify = verify  # tests inject a verifier; the gateway uses addons.identity.addon
        self.api = ApprovalsAPI(self.store, self._verify_reviewer, link=self._link,
                                on_vote=self._on_vote, holder=holder)
        self.notifier = Notifier()
        self.slack = SlackMessenger(self.notifier, lambda: self._config().slack,
                                    self._slack_webhook, self._retry, self._link)
        self.slack_interactions = SlackInteractions(self.store, lambda: self._config().slack,
                                                    self.slack, on_vote=self._on_vote)
        self.store.listeners.append(self._changed)
        self.api.mount(*self.extra_handlers())  # Slack's callback, on the reviewers' listener
        # every held flow of an approval (a retry joins the first request's hold)
        self._flows: dict[str, list[http.HTTPFlow]] = {}
        self._intents: dict[str, str] = {}  # intent key -> pending approval id
        self._gone: set[str] = set()  # ids of held flows whose client went away
        # holds of callers that are not HTTP flows (the database path): id -> wake-up event
        self._external: dict[str, asyncio.Event] = {}
        self._api_spec: tuple[str, int] | None | bool = False  # False: not started
        self._api_lock: asyncio.Lock | None = None
        self._api_started = False  # listened once: a later bind error does not stop mitmproxy
        self._running = False
        self._tasks: set[asyncio.Task] = set()
        holder.on_change(self._rules_changed)

    # ------------------------------------------------------------ options and lifecycle
    def load(self, loader: Any) -> None:
        # Precedence: --set agentgate_approvals_listen > $AGENTGATE_APPROVALS_LISTEN >
        # approvals.listen of the rules (the env var is the option's default, like
        # AGENTGATE_RULES), so a container can move the port without a rules file.
        loader.add_option(
            "agentgate_approvals_listen", str, os.environ.get(LISTEN_ENV, "").strip(),
            "Address of the reviewers' approvals API (host:port, or 'off'); "
            f"overrides approvals.listen of the rules when set (default: ${LISTEN_ENV}).")

    def configure(self, updated: set[str]) -> None:
        if self._state_error and not self._state_reported:
            # Raised once, at the first configure (the script's load: mitmdump exits on an
            # error logged while starting). Raising on every call would loop: mitmproxy
            # answers an OptionsError from an options update by rolling back and configuring
            # again, which would raise again, forever (RecursionError, GBs of log, a process
            # that ignores SIGTERM). Holds stay refused (_refuse_holds) if it runs on.
            self._state_reported = True
            raise exceptions.OptionsError(f"${STATE_ENV}: {self._state_error}")
        if "agentgate_approvals_listen" in updated:
            try:
                parse_listen(ctx.options.agentgate_approvals_listen)
            except ValueError as e:
                where = "agentgate_approvals_listen"
                if os.environ.get(LISTEN_ENV, "").strip() == \
                        ctx.options.agentgate_approvals_listen:
                    where += f" (from ${LISTEN_ENV})"
                raise exceptions.OptionsError(f"{where}: {e}") from None
            if self._running:
                self._spawn(self._start_api())

    # `running` and `done` are sync on purpose: on a script reload mitmproxy invokes them
    # with invoke_addon_sync, which refuses coroutine hooks and aborts the reload.
    def running(self) -> None:
        self._running = True
        self._state_from_rules()
        self._spawn(self._start_api())
        if self.store.shared:
            self._spawn(self.store.start())

    @property
    def ready(self) -> bool:
        """Holds can be opened (readiness probe)."""
        return not self._refuse_holds and self.store.ready

    def _state_from_rules(self) -> None:
        """`state:` of the rules (when $AGENTGATE_STATE is not set): the shared store, in
        place before the first hold. Configured but unusable is an error (mitmdump stops at
        startup): falling back to holds in memory would split them across replicas."""
        st = getattr(self.holder.rules, "state", None)
        self._state_cfg = st
        if self.store.shared or st is None:
            return
        dsn = st.resolve()
        if not dsn:
            log.error("agentgate: state.url_env: the environment variable %s is not set; "
                      "held requests are refused until the gateway restarts with it",
                      st.url_env)
            self._refuse_holds = True
            return
        try:
            store = PgApprovalStore(dsn)
        except ValueError as e:
            log.error("agentgate: state (from %s): %s; held requests are refused",
                      f"${st.url_env}" if st.url_env else "the rules", e)
            self._refuse_holds = True
            return
        old = self.store
        store.listeners = old.listeners  # the API's and this addon's watchers
        store.on_decided = self._on_decided
        store.max_pending, store.max_pending_per_identity = (old.max_pending,
                                                             old.max_pending_per_identity)
        self.store = self.api.store = self.slack_interactions.store = store

    def extra_handlers(self) -> list[tuple[str, type, dict[str, Any]]]:
        """Handlers the reviewers' tornado app mounts beside its own (Slack's callback)."""
        return [(r"/slack/actions", SlackActionsHandler,
                 {"interactions": self.slack_interactions})]

    def done(self) -> asyncio.Task | None:
        """Cancel every hold and stop listening. The holds' "cancelled" updates (Slack,
        webhook) are still delivered: the returned task drains the notifier within
        notify.SHUTDOWN_GRACE. A plain function returning an awaitable, because mitmproxy
        awaits what a hook returns when it stops (AddonManager.invoke_addon), while a
        script reload (invoke_addon_sync) refuses `async def` hooks and lets the task run
        on in the background (tests/approval/test_shutdown.py checks both)."""
        self._running = False
        held = [f for flows in self._flows.values() for f in flows]
        for approval_id in [*self._flows, *self._external]:
            self.store.cancel(approval_id, "the gateway is stopping")
        if self.store.shared:
            self.store.close()  # records those cancellations, gives up the replica's lease
        self.api.close_now()
        self._api_spec = False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test): nothing can be delivered
            self.notifier.cancel_all()
            return None
        task = loop.create_task(self._stopping(held))
        self._tasks.add(task)  # a reload drops what done() returns: keep it alive
        task.add_done_callback(self._tasks.discard)
        return task

    async def _stopping(self, held: list[http.HTTPFlow]) -> None:
        """Within notify.SHUTDOWN_GRACE: the held flows' clients get their 503 (the
        cancelled holds resumed them; mitmproxy marks a flow not live once its answer is
        written), then the notifications in flight go out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE
        while any(f.live and f.client_conn.connected for f in held) \
                and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.notifier.drain(max(0.0, deadline - loop.time()))

    def _config(self) -> ApprovalsConfig:
        rules = self.holder.rules
        cfg = getattr(rules, "approvals", None)
        return cfg if isinstance(cfg, ApprovalsConfig) else ApprovalsConfig()

    def _listen(self) -> tuple[str, int] | None:
        opt = ""
        try:
            opt = ctx.options.agentgate_approvals_listen
        except (AttributeError, KeyError):
            pass
        return parse_listen(opt) if opt else self._config().listen

    def _rules_changed(self, rules: Any) -> None:
        if self._running and getattr(rules, "state", None) != self._state_cfg:
            log.warning("agentgate: state: changed in the rules; it applies when the gateway "
                        "restarts (the holds stay where they are)")
        cfg = self._config()
        self.store.max_pending = cfg.max_pending
        self.store.max_pending_per_identity = cfg.max_pending_per_identity
        if self._running:
            self._spawn(self._start_api())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return
        task = loop.create_task(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _start_api(self) -> None:
        if self._api_lock is None:
            self._api_lock = asyncio.Lock()
        async with self._api_lock:
            want = self._listen()
            if want == self._api_spec:
                return
            await self.api.stop()
            self._api_spec = want
            if want is None:
                log.info("agentgate: approvals API is off")
                return
            try:
                host, port = await self.api.start(*want)
            except OSError as e:
                self._api_spec = False  # try again on the next rules or option change
                # Logged as an error, which makes mitmproxy stop during startup: say which
                # address is taken and every way to pick another.
                reason = bind_reason(e)
                if _under_mitmweb() and getattr(ctx.options, "web_port", None) == want[1]:
                    # both default to 8081: the usual clash under `./run_proxy.sh web`
                    reason = (f"mitmweb's own web UI listens there (web_port {want[1]}): start "
                              "it with --set web_port=8082 (e.g. ./run_proxy.sh web --set "
                              "web_port=8082), or move the approvals API")
                log.error("agentgate: approvals API cannot listen on %s: %s. Choose another "
                          "address with %s=HOST:PORT (or --set agentgate_approvals_listen="
                          "HOST:PORT, or approvals.listen in the rules; 'off' runs without "
                          "the reviewers' API)%s", listen_text(want), reason, LISTEN_ENV,
                          "; meanwhile held requests can only be decided in mitmweb or "
                          "time out" if self._api_started else "")
                return
            self._api_started = True
            log.info("agentgate: approvals API listening at %s", url_for((host, port)))

    def _link(self, approval_id: str) -> str:
        return self._config().link(approval_id, self.api.address or self._listen())

    async def _verify_reviewer(self, token: str) -> dict[str, Any]:
        if self._verify is not None:
            return await self._verify(token)
        # the identity concern's contract; an ImportError here is a 503 for the reviewer
        from addons.identity.addon import verify_token
        from addons.identity.jwt import TokenError
        try:
            return await verify_token(self.holder, token)
        except TokenError as e:
            if getattr(e, "status", 401) >= 500:  # no keys loaded, no rules: not the token
                raise RuntimeError("token verification unavailable") from None
            raise AuthError(str(getattr(e, "reason", "") or "invalid token")) from None

    # ------------------------------------------------------------ holding a flow
    @guarded(STEP)
    async def request(self, f: http.HTTPFlow) -> None:
        dec = f.metadata.get("decision")
        if not isinstance(dec, dict) or dec.get("action") != "approve" or dec.get("observed"):
            return
        if not f.live:
            return  # loaded from a file: it goes nowhere, and was decided when it happened
        cfg = self._config()
        spec = spec_from_decision(dec, cfg)
        if self._refuse_holds:
            refuse(f, 503, "the shared approval store (state:) is not usable; the request "
                   "cannot be held for approval", "approval_store_unavailable", STEP, spec.rule)
            return
        ident = f.metadata.get("identity")
        requester = ident.get("sub") if isinstance(ident, dict) else None
        # hashing a big body (up to the edge limit) would stall every flow: off the loop
        big = len(f.request.raw_content or b"") > HASH_INLINE_BYTES
        key = await asyncio.to_thread(intent_key, f, spec) if big else intent_key(f, spec)
        if big and not f.client_conn.connected:
            # it left while we hashed (client_disconnected found nothing held to mark)
            refuse(f, 503, "the client disconnected", "approval_cancelled", STEP, spec.rule)
            return
        joined = self.store.get(self._intents.get(key, ""))
        if joined is not None and not joined.decided:
            if len(self._flows.get(joined.id, ())) >= cfg.max_pending_per_identity:
                # joining costs no approval but holds a flow: the same cap as for holds,
                # or one agent could park thousands of identical requests on one hold
                refuse(f, 429, "too many copies of this request are awaiting approval "
                       f"({cfg.max_pending_per_identity})", "approval_quota_exceeded", STEP,
                       spec.rule)
                return
            a = joined
            log.info("agentgate: %s %s repeats the request held by approval %s: joined "
                     "(no new hold)", f.request.method, f.request.pretty_url.split("?")[0],
                     a.id)
        else:
            what, preview, truncated = describe_request(f, cfg.preview_bytes)
            try:
                # a shared store may answer with another replica's hold of this intent
                a, elsewhere = await self.store.aopen(
                    spec, requester if isinstance(requester, str) else None, what, preview,
                    truncated, owner=owner_of(f), intent=key)
            except ApprovalError as e:
                refuse(f, e.status, e.message, e.code, STEP, spec.rule)
                return
            self._intents[key] = a.id
            if elsewhere:
                joined = a
                log.info("agentgate: %s %s repeats the request held by approval %s on "
                         "another replica: joined (no new hold)", what["method"], what["url"],
                         a.id)
        if joined is not a:
            log.info("agentgate: holding %s %s for approval %s (rule %s, requester %s, "
                     "timeout %gs)", what["method"], what["url"], a.id, spec.rule,
                     a.requester or "-", spec.timeout)
        f.metadata["approval"] = dict(a.metadata(), joined=joined is a)
        self._flows.setdefault(a.id, []).append(f)
        f.intercept()
        f.marked = HELD_MARK
        self._set_comment(f, a)
        self._update(f)
        if joined is not a:
            self._notify(a, cfg)
        try:
            await self._wait(f, a)
        except asyncio.CancelledError:
            self._leave(f, a)
            if not self._flows.get(a.id):  # joined copies still waiting keep the hold
                self.store.cancel(a.id, "hold cancelled")
            raise
        self._leave(f, a)
        self._finish(f, a, cfg)

    def _leave(self, f: http.HTTPFlow, a: PendingApproval) -> None:
        """This flow stops waiting. If it was the last one and its client went away, the
        hold waits approvals.retry_grace seconds for a retry to join before it is cancelled."""
        flows = self._flows.get(a.id, [])
        if f in flows:
            flows.remove(f)
        gone = f.id in self._gone
        self._gone.discard(f.id)
        if flows:
            return
        self._flows.pop(a.id, None)
        if a.decided:
            self._forget_intent(a)
        elif gone:
            grace = min(self._config().retry_grace, max(0.0, a.expires_at - self.store.clock()))
            asyncio.get_running_loop().call_later(grace, self._orphaned, a.id)

    def _orphaned(self, approval_id: str) -> None:
        a = self.store.get(approval_id)
        if a is not None and not a.decided and not self._flows.get(approval_id):
            reason = (f"the client disconnected (no retry within "
                      f"{self._config().retry_grace:g}s)")
            self.store.cancel(approval_id, reason)
            log.info("agentgate: approval %s cancelled: %s", approval_id, reason)

    def _forget_intent(self, a: PendingApproval) -> None:
        for key in [k for k, v in self._intents.items() if v == a.id]:
            del self._intents[key]

    async def _wait(self, f: http.HTTPFlow, a: PendingApproval) -> None:
        # the deadline is the approval's, not this flow's: a joined retry waits no longer
        while not a.decided:
            remaining = a.expires_at - self.store.clock()
            if remaining <= 0:
                self.store.expire(a.id)
                break
            if f.id in self._gone:
                break  # this client went away; the hold may still be joined by its retry
            if f.error is not None:  # killed by the operator: nothing left to release
                self.store.cancel(a.id, "flow killed in mitmweb")
                break
            if not f.intercepted:
                self._resumed_elsewhere(f, a)
                continue
            try:
                await asyncio.wait_for(f.wait_for_resume(), min(remaining, POLL_SECONDS))
            except TimeoutError:
                pass

    def _resumed_elsewhere(self, f: http.HTTPFlow, a: PendingApproval) -> None:
        """Someone resumed the flow without a decision: the mitmweb operator."""
        if a.spec.allow_mitmweb:
            try:
                self.store.approve(a.id, OPERATOR, via=VIA_MITMWEB)
                log.info("agentgate: approval %s: mitmweb resume counted as approval by %s",
                         a.id, OPERATOR)
            except ApprovalError as e:
                a.notes.append(e.message)
            if a.decided:
                return
        else:
            a.notes.append(f"mitmweb resume ignored: rule {a.spec.rule} needs reviewer "
                           "approval (allow_mitmweb is off)")
            log.warning("agentgate: approval %s: resume from mitmweb ignored (rule %s does "
                        "not allow mitmweb approval); still held", a.id, a.spec.rule)
        f.intercept()  # hold again
        f.metadata["approval"] = dict(f.metadata.get("approval") or {}, **a.metadata())
        self._set_comment(f, a)
        self._update(f)

    def _finish(self, f: http.HTTPFlow, a: PendingApproval, cfg: ApprovalsConfig) -> None:
        f.metadata["approval"] = dict(f.metadata.get("approval") or {}, **a.metadata())
        rule = a.spec.rule
        masked = bool(f.metadata.get("findings"))
        if not a.decided:  # this client went away; the hold stays open for its retry
            # this request's record: cancelled (the approval itself may still be decided
            # for the retry that joins it, which gets its own record)
            f.metadata["approval"].update(state=CANCELLED, left=True,
                                          reason="the client disconnected while held")
            refuse(f, 503, "the client disconnected while the request was held",
                   "approval_cancelled", STEP, rule)
        elif a.state == APPROVED or (a.state == TIMEOUT and a.spec.on_timeout == "allow"):
            # a masked request keeps its lock: what went upstream was rewritten
            f.marked = ":lock:" if masked else MARKS[APPROVED]
        elif a.state == DENIED:
            refuse(f, 403, f"request denied by a reviewer: {a.reason}", "approval_denied",
                   STEP, rule)
        elif a.state == TIMEOUT:
            refuse(f, cfg.timeout_status,
                   f"no approval within {a.spec.timeout:g}s; request refused",
                   "approval_timeout", STEP, rule)
        elif a.state == CANCELLED and f.error is None:
            refuse(f, 503, f"approval cancelled: {a.reason}", "approval_cancelled", STEP, rule)
        state = a.state if a.decided else CANCELLED
        if f.marked not in (":lock:", MARKS[APPROVED]) and state in MARKS:
            f.marked = MARKS[state]  # after refuse(), which marks every refusal alike
        log.info("agentgate: approval %s %s (%s)", a.id, a.state, a.reason)
        f.resume()
        self._set_comment(f, a)
        self._update(f)

    # ------------------------------------------------------------ holding anything else
    async def hold(self, spec: ApprovalSpec, requester: str | None, what: dict[str, Any],
                   preview: str, *, truncated: bool = False, owner: str | None = None,
                   gone: Callable[[], bool] | None = None) -> PendingApproval:
        """Hold something that is not an HTTP flow (a SQL statement, …) until it is decided.

        Same store, quotas, notifications and reviewers as a held flow; returns the decided
        approval (state approved/denied/timeout/cancelled: the caller answers in its own
        protocol). `gone()` is polled: True (the client went away) cancels the hold.
        Raises ApprovalError when the hold cannot be opened (quota, too many pending)."""
        cfg = self._config()
        if self._refuse_holds:
            raise ApprovalError(503, "approval_store_unavailable",
                                "the shared approval store (state:) is not usable")
        a = await self.store.acreate(spec, requester, what, preview, truncated,
                                     owner=owner or f"id:{requester or '-'}")
        event = self._external[a.id] = asyncio.Event()
        log.info("agentgate: holding %s for approval %s (rule %s, requester %s, timeout %gs)",
                 what.get("kind") or "a request", a.id, spec.rule, a.requester or "-",
                 spec.timeout)
        self._notify(a, cfg)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + a.spec.timeout
        try:
            while not a.decided:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.store.expire(a.id)
                    break
                if gone is not None and gone():
                    self.store.cancel(a.id, "the client disconnected")
                    break
                try:
                    await asyncio.wait_for(event.wait(), min(remaining, POLL_SECONDS))
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            self.store.cancel(a.id, "hold cancelled")
            raise
        finally:
            self._external.pop(a.id, None)
        log.info("agentgate: approval %s %s (%s)", a.id, a.state, a.reason)
        return a

    def _on_decided(self, a: PendingApproval) -> None:
        # the store keeps up to keep_decided approvals for late votes and the history: a
        # decided one keeps a short preview, not the whole request (1000 x 256 KiB)
        if len(a.preview) > DECIDED_PREVIEW_CHARS:
            a.preview = a.preview[:DECIDED_PREVIEW_CHARS]
            a.preview_truncated = True
        event_ = self._external.get(a.id)
        if event_ is not None:
            event_.set()
            return
        self._forget_intent(a)  # a new request after a decision is a new intent
        for f in self._flows.get(a.id, []):
            f.metadata["approval"] = dict(f.metadata.get("approval") or {}, **a.metadata())
            f.resume()  # wakes the waiting hook, which answers or forwards the flow

    def _on_vote(self, a: PendingApproval) -> None:
        if a.decided:
            return
        for f in self._flows.get(a.id, []):
            f.metadata["approval"] = dict(f.metadata.get("approval") or {}, **a.metadata())
            self._set_comment(f, a)
            self._update(f)

    def _changed(self, a: PendingApproval) -> None:
        """Store listener: every vote and decision updates the notifications."""
        if a.state == PENDING and not a.votes:
            return  # just opened: announced by _notify with the rule's config
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test driving the store): nothing to deliver
        n = self._config().notify
        if n is not None and n.format == "json":
            self.notifier.submit(n.resolve, event("approval.decided" if a.decided
                                                  else "approval.voted", a, self._link(a.id)),
                                 retries=n.retries, backoff=n.backoff,
                                 max_backoff=n.max_backoff, timeout=n.timeout,
                                 ca_file=n.ca_file, label=a.id, order=a.id)
        self.slack.changed(a)

    @staticmethod
    def _set_comment(f: http.HTTPFlow, a: PendingApproval) -> None:
        # first line: the decision and the rule (what a comment column shows)
        state = "held for approval" if not a.decided else f"approval {a.state}"
        lines = [f"{state} by rule {a.spec.rule} ({a.id})"
                 + (f": {a.spec.message}" if a.spec.message else "")]
        if a.decided:
            lines.append(f"outcome: {a.reason}")
        lines.append(f"requester: {a.requester or '-'}; needs {a.spec.min_approvals} "
                     f"approval(s) from {', '.join(a.spec.groups) or '-'}; "
                     f"{len(a.approvers)} so far" + (f" ({', '.join(a.approvers)})"
                                                     if a.approvers else ""))
        for v in a.votes:
            lines.append(f"{v.decision} by {v.sub} via {v.via}"
                         + (f": {v.reason}" if v.reason else ""))
        if not a.decided:
            lines.append(f"approve: agentgate approvals approve {a.id}"
                         + (f" (or agentgate.approve {a.id} in mitmweb)"
                            if a.spec.allow_mitmweb else "")
                         + f"; deny: agentgate.deny {a.id} \"reason\"")
        lines += a.notes[-2:]
        f.comment = "\n".join(lines)

    @staticmethod
    def _update(f: http.HTTPFlow) -> None:
        """Tell mitmweb's view that the flow changed (intercepted, comment)."""
        try:
            ctx.master.addons.trigger(hooks.UpdateHook([f]))
        except Exception:  # noqa: BLE001 - no master in unit tests; cosmetic only
            log.debug("no master to notify of a flow update")

    def _retry(self) -> Retry:
        n = self._config().notify
        return Retry(n.retries, n.backoff, n.max_backoff, n.timeout, n.ca_file) if n \
            else Retry()

    def _slack_webhook(self) -> str | None:
        n = self._config().notify
        return n.resolve() if n is not None and n.format == "slack" else None

    def _notify(self, a: PendingApproval, cfg: ApprovalsConfig) -> None:
        n = cfg.notify
        if n is not None and n.format == "json":
            self.notifier.submit(n.resolve, event("approval.created", a, self._link(a.id)),
                                 retries=n.retries, backoff=n.backoff,
                                 max_backoff=n.max_backoff, timeout=n.timeout,
                                 ca_file=n.ca_file, still_wanted=lambda: not a.decided,
                                 label=a.id, order=a.id)
        elif n is not None:
            self.notifier.spawn(self._webhook_check(a, n))
        self.slack.created(a)

    async def _webhook_check(self, a: PendingApproval, n: Any) -> None:
        if not await asyncio.to_thread(n.resolve):  # a secret file: read off the loop
            log.error("agentgate: approval %s: notification webhook not available (%s); "
                      "the request stays held", a.id, n.describe())

    # ------------------------------------------------------------ client gone
    @guarded(STEP, skip_answered=False)
    def client_disconnected(self, client: connection.Client) -> None:
        for flows in list(self._flows.values()):
            for f in flows:
                if f.client_conn.id == client.id:
                    self._gone.add(f.id)
                    f.resume()  # wake its hook now rather than at the next poll

    # ------------------------------------------------------------ mitmweb commands
    def _targets(self, target: str) -> list[PendingApproval]:
        """Pending approvals named by an approval id, a flow id or a flow spec."""
        target = target.strip()
        a = self.store.get(target) if target.startswith("ap-") else None
        if a is not None:
            return [a] if not a.decided else []
        if target == "@focus" and _under_mitmweb():
            # mitmweb's view keeps a focus the UI never moves (the first flow shown): it is
            # not the flow the operator selected, and approving it would approve another
            raise exceptions.CommandError(
                "@focus is not the selected flow in mitmweb (the web UI does not tell the "
                "gateway which flow is selected): use the approval id from the flow's "
                "comment, e.g. agentgate.approve ap-… (or @<flow id> from its URL)")
        spec = target if target.startswith("@") or " " in target or "~" in target \
            else f"@{target}"
        try:
            flows = ctx.master.commands.call("view.flows.resolve", spec)
        except exceptions.CommandError:
            raise
        except Exception as e:  # noqa: BLE001 - no view (mitmdump without it)
            raise exceptions.CommandError(f"cannot resolve {target!r} ({type(e).__name__}); "
                                          "name the approval id (ap-…)") from None
        return self._pending_of(flows)

    def _pending_of(self, flows: Sequence[flow.Flow]) -> list[PendingApproval]:
        out: list[PendingApproval] = []
        for f in flows:
            meta = f.metadata.get("approval")
            if isinstance(meta, dict) and meta.get("id") in self._flows:
                a = self.store.get(meta["id"])
                if a is not None and not a.decided and a not in out:
                    out.append(a)
        return out

    @command.command("agentgate.approve")
    def approve_cmd(self, target: str, reason: str = "") -> None:
        """Approve one held request as the mitmweb operator (only where its rule allows
        it): its approval id (ap-…), its flow id, or a flow spec matching one held flow."""
        found = self._targets(target)
        if not found:
            raise exceptions.CommandError(f"no pending approval matches {target!r}")
        if len(found) > 1:
            # one command must not approve everything at once: approvals go one by one
            raise exceptions.CommandError(
                f"{target!r} matches {len(found)} held requests; approve them one at a time "
                "by approval id (" + ", ".join(a.id for a in found[:5]) + ")")
        a = found[0]
        try:
            self.store.approve(a.id, OPERATOR, via=VIA_MITMWEB, reason=reason or None)
        except ApprovalError as e:
            raise exceptions.CommandError(f"{a.id}: {e.message}") from None
        log.info("agentgate: approval %s: approved by %s", a.id, OPERATOR)
        self._on_vote(a)

    @command.command("agentgate.deny")
    def deny_cmd(self, target: str, reason: str = "denied by the mitmweb operator") -> None:
        """Deny held requests as the mitmweb operator (always allowed): an approval id
        (ap-…), a flow id, or a flow spec (@all denies every held request)."""
        found = self._targets(target)
        if not found:
            raise exceptions.CommandError(f"no pending approval matches {target!r}")
        for a in found:
            self.store.deny(a.id, OPERATOR, reason=reason, via=VIA_MITMWEB)
            log.info("agentgate: approval %s: denied by %s", a.id, OPERATOR)

    @command.command("agentgate.approvals")
    def list_cmd(self) -> Sequence[str]:
        """Pending approvals: id, rule, requester, age, what."""
        now = time.time()
        return [f"{a.id} rule={a.spec.rule} requester={a.requester or '-'} "
                f"age={now - a.requested_at:.0f}s approvals={len(a.approvers)}/"
                f"{a.spec.min_approvals} {a.what.get('kind') or 'http'}: "
                f"{a.what.get('tool') or a.what.get('model') or a.what.get('url') or ''} "
                f"{a.what.get('summary') or ''}".rstrip()
                for a in self.store.pending()]

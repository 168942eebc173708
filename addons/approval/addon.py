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

mitmweb: `agentgate.approve @focus` / `agentgate.deny @focus "reason"` from the command bar.
The operator's approval (and a plain "resume" click) counts as one vote of the reviewer
"mitmweb-operator" only when the rule allows it (`allow_mitmweb`); otherwise a resume is
ignored: the flow is intercepted again and stays held (the comment says why). The
operator may always deny.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
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
from addons.approval.notify import Notifier
from addons.approval.store import (
    APPROVED,
    CANCELLED,
    DENIED,
    OPERATOR,
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
MODEL_SCAN_BYTES = 1024 * 1024


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


def describe_request(f: http.HTTPFlow, preview_chars: int) -> tuple[dict[str, Any], str, bool]:
    """(what, preview, truncated) of a request, for reviewers. The body is already masked
    (the masking addon runs first); the query string is left out (it may hold keys)."""
    req = f.request
    up = f.metadata.get("upstream")
    what: dict[str, Any] = {
        "method": req.method,
        "url": f"{req.scheme}://{req.pretty_host}"
               + (f":{req.port}" if req.port not in (80, 443) else "") + req.path.split("?")[0],
        "host": req.pretty_host,
        "path": req.path.split("?")[0],
        "upstream": up.get("name") if isinstance(up, dict) else None,
        "model": None,
        "body_bytes": len(req.raw_content or b""),
        "kind": kind_of(f),
    }
    try:  # the one bounded decoder: `get_content` inflates without any limit
        body = decode.request_body(f)
        raw = body.data if body is not None else b""
    except decode.DecodeError:
        raw = b""
    if raw and len(raw) <= MODEL_SCAN_BYTES and raw.lstrip()[:1] == b"{":
        try:
            model = json.loads(raw).get("model")
            if isinstance(model, str):
                what["model"] = model[:200]
        except (ValueError, AttributeError):
            pass
    text = raw[: preview_chars * 4 + 4].decode("utf-8", errors="replace")
    truncated = len(text) > preview_chars or len(raw) > preview_chars * 4 + 4
    return what, text[:preview_chars], truncated


def slack_payload(a: PendingApproval, link: str) -> dict[str, Any]:
    """A Slack-compatible incoming-webhook message (`text` + `blocks`)."""
    w = a.what
    target = f"{w.get('method')} {w.get('url')}" + (f" (model {w['model']})"
                                                    if w.get("model") else "")
    who = a.requester or "an unauthenticated caller"
    needs = (f"{a.spec.min_approvals} approval(s) from {', '.join(a.spec.groups) or '-'}; "
             f"times out in {a.spec.timeout:g}s ({a.spec.on_timeout})")
    lines = [f"agentgate: request held for approval {a.id}",
             f"rule: {a.spec.rule}" + (f" ({a.spec.message})" if a.spec.message else ""),
             f"from: {who}", f"request: {target}", f"needs: {needs}",
             f"approve: agentgate approvals approve {a.id}",
             f"deny: agentgate approvals deny {a.id} --reason '...'"]
    if link:
        lines.append(f"details: {link}")
    text = "\n".join(lines)
    return {
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
        "approval_id": a.id,
        "rule": a.spec.rule,
        "link": link,
    }


class Approval:
    def __init__(self, holder: RulesHolder, store: ApprovalStore | None = None,
                 verify: Callable[[str], Awaitable[dict[str, Any]]] | None = None) -> None:
        self.holder = holder
        self.store = store or ApprovalStore()
        self.store.on_decided = self._on_decided
        self._verify = verify  # tests inject a verifier; the gateway uses addons.identity.addon
        self.api = ApprovalsAPI(self.store, self._verify_reviewer, link=self._link,
                                on_vote=self._on_vote)
        self.notifier = Notifier()
        self._flows: dict[str, http.HTTPFlow] = {}
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
        self._spawn(self._start_api())

    def done(self) -> None:
        self._running = False
        for approval_id in [*self._flows, *self._external]:
            self.store.cancel(approval_id, "the gateway is stopping")
        self.notifier.cancel_all()
        self.api.close_now()
        self._api_spec = False

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
                log.error("agentgate: approvals API cannot listen on %s: %s. Choose another "
                          "address with %s=HOST:PORT (or --set agentgate_approvals_listen="
                          "HOST:PORT, or approvals.listen in the rules; 'off' runs without "
                          "the reviewers' API)%s", listen_text(want), bind_reason(e), LISTEN_ENV,
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
        cfg = self._config()
        spec = spec_from_decision(dec, cfg)
        ident = f.metadata.get("identity")
        requester = ident.get("sub") if isinstance(ident, dict) else None
        what, preview, truncated = describe_request(f, cfg.preview_chars)
        try:
            a = self.store.create(spec, requester if isinstance(requester, str) else None,
                                  what, preview, truncated, owner=owner_of(f))
        except ApprovalError as e:
            refuse(f, e.status, e.message, e.code, STEP, spec.rule)
            return
        f.metadata["approval"] = a.metadata()
        self._flows[a.id] = f
        f.intercept()
        f.marked = ":hourglass:"
        self._set_comment(f, a)
        self._update(f)
        log.info("agentgate: holding %s %s for approval %s (rule %s, requester %s, "
                 "timeout %gs)", what["method"], what["url"], a.id, spec.rule,
                 a.requester or "-", spec.timeout)
        self._notify(a, cfg)
        try:
            await self._wait(f, a)
        except asyncio.CancelledError:
            self.store.cancel(a.id, "hold cancelled")
            raise
        finally:
            self._flows.pop(a.id, None)
        self._finish(f, a, cfg)

    async def _wait(self, f: http.HTTPFlow, a: PendingApproval) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + a.spec.timeout
        while not a.decided:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.store.expire(a.id)
                break
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
        f.metadata["approval"] = a.metadata()
        self._set_comment(f, a)
        self._update(f)

    def _finish(self, f: http.HTTPFlow, a: PendingApproval, cfg: ApprovalsConfig) -> None:
        f.metadata["approval"] = a.metadata()
        rule = a.spec.rule
        if a.state == APPROVED:
            f.marked = ":white_check_mark:"
        elif a.state == DENIED:
            refuse(f, 403, f"request denied by a reviewer: {a.reason}", "approval_denied",
                   STEP, rule)
        elif a.state == TIMEOUT:
            if a.spec.on_timeout == "allow":
                f.marked = ":white_check_mark:"
            else:
                refuse(f, cfg.timeout_status,
                       f"no approval within {a.spec.timeout:g}s; request refused",
                       "approval_timeout", STEP, rule)
        elif a.state == CANCELLED and f.error is None:
            refuse(f, 503, f"approval cancelled: {a.reason}", "approval_cancelled", STEP, rule)
        log.info("agentgate: approval %s %s (%s)", a.id, a.state, a.reason)
        f.resume()
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
        a = self.store.create(spec, requester, what, preview, truncated,
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
        event = self._external.get(a.id)
        if event is not None:
            event.set()
            return
        f = self._flows.get(a.id)
        if f is not None:
            f.metadata["approval"] = a.metadata()
            f.resume()  # wakes the waiting hook, which answers or forwards the flow

    def _on_vote(self, a: PendingApproval) -> None:
        f = self._flows.get(a.id)
        if f is not None and not a.decided:
            f.metadata["approval"] = a.metadata()
            self._set_comment(f, a)
            self._update(f)

    @staticmethod
    def _set_comment(f: http.HTTPFlow, a: PendingApproval) -> None:
        lines = [f"held for approval {a.id} by rule {a.spec.rule}"
                 + (f": {a.spec.message}" if a.spec.message else ""),
                 f"requester: {a.requester or '-'}; needs {a.spec.min_approvals} approval(s) "
                 f"from {', '.join(a.spec.groups) or '-'}; "
                 f"{len(a.approvers)} so far" + (f" ({', '.join(a.approvers)})"
                                                 if a.approvers else ""),
                 f"approve: agentgate approvals approve {a.id}"
                 + (" (or agentgate.approve in mitmweb)" if a.spec.allow_mitmweb else "")]
        lines += a.notes[-2:]
        f.comment = "\n".join(lines)

    @staticmethod
    def _update(f: http.HTTPFlow) -> None:
        """Tell mitmweb's view that the flow changed (intercepted, comment)."""
        try:
            ctx.master.addons.trigger(hooks.UpdateHook([f]))
        except Exception:  # noqa: BLE001 - no master in unit tests; cosmetic only
            log.debug("no master to notify of a flow update")

    def _notify(self, a: PendingApproval, cfg: ApprovalsConfig) -> None:
        n = cfg.notify
        if n is None:
            return
        url = n.resolve()
        if not url:
            log.error("agentgate: approval %s: notification webhook not available (%s); "
                      "the request stays held", a.id, n.describe())
            return
        self.notifier.submit(url, slack_payload(a, self._link(a.id)), retries=n.retries,
                             backoff=n.backoff, max_backoff=n.max_backoff, timeout=n.timeout,
                             ca_file=n.ca_file, still_wanted=lambda: not a.decided)

    # ------------------------------------------------------------ client gone
    @guarded(STEP, skip_answered=False)
    def client_disconnected(self, client: connection.Client) -> None:
        for approval_id, f in list(self._flows.items()):
            if f.client_conn.id == client.id:
                self.store.cancel(approval_id, "the client disconnected")

    # ------------------------------------------------------------ mitmweb commands
    def _pending_of(self, flows: Sequence[flow.Flow]) -> list[PendingApproval]:
        out = []
        for f in flows:
            meta = f.metadata.get("approval")
            if isinstance(meta, dict) and meta.get("id") in self._flows:
                a = self.store.get(meta["id"])
                if a is not None and not a.decided:
                    out.append(a)
        return out

    @command.command("agentgate.approve")
    def approve_cmd(self, flows: Sequence[flow.Flow]) -> None:
        """Approve held flows as the mitmweb operator (only where the rule allows it)."""
        errors = []
        for a in self._pending_of(flows):
            try:
                self.store.approve(a.id, OPERATOR, via=VIA_MITMWEB)
                log.info("agentgate: approval %s: approved by %s", a.id, OPERATOR)
                self._on_vote(a)
            except ApprovalError as e:
                errors.append(f"{a.id}: {e.message}")
        if errors:
            raise exceptions.CommandError("; ".join(errors))

    @command.command("agentgate.deny")
    def deny_cmd(self, flows: Sequence[flow.Flow],
                 reason: str = "denied by the mitmweb operator") -> None:
        """Deny held flows as the mitmweb operator (always allowed)."""
        for a in self._pending_of(flows):
            self.store.deny(a.id, OPERATOR, reason=reason, via=VIA_MITMWEB)
            log.info("agentgate: approval %s: denied by %s", a.id, OPERATOR)

    @command.command("agentgate.approvals")
    def list_cmd(self) -> Sequence[str]:
        """Pending approvals: id, rule, requester, age."""
        import time
        now = time.time()
        return [f"{a.id} rule={a.spec.rule} requester={a.requester or '-'} "
                f"age={now - a.requested_at:.0f}s approvals={len(a.approvers)}/"
                f"{a.spec.min_approvals}" for a in self.store.pending()]

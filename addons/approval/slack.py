"""Slack notifications that act: Block Kit messages with Approve / Deny buttons, the
interactive callback that decides through the store, and the same message updated on every
state change.

```yaml
approvals:
  slack:
    signing_secret_env: SLACK_SIGNING_SECRET   # or signing_secret_file:
    bot_token_env: SLACK_BOT_TOKEN             # optional: chat.postMessage / chat.update
    channel: C0123ABCD                         # needed with a bot token
    users: {U0123ABCD: alice@corp.example}     # Slack user -> reviewer subject
    groups: {approvers: [U0123ABCD]}           # reviewer groups by Slack user
```

The callback (mounted by the reviewers' app at /slack/actions) checks Slack's v0 request
signature: HMAC-SHA256 of `v0:{timestamp}:{body}` with the signing secret, compared in
constant time, the timestamp within five minutes of our clock, and each signature accepted
once (a replayed request is refused even inside the window). A Slack user who is not in
`users` cannot decide; groups come only from `groups` (Slack says nothing about ours).

Deny asks for a reason in a modal when a bot token is configured (views.open needs one);
without one, Deny decides at once with the reason "denied in Slack by <subject>".

How a message is updated on a state change (approved, denied, timed out, cancelled, and
each vote of a multi-approval hold): with a bot token, chat.update of the message it
posted; otherwise through the `response_url` of the latest button click on it; otherwise
(an incoming webhook nobody clicked: Slack gives no handle to edit that message) a short
follow-up message to the webhook.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tornado.web

from addons.approval.notify import Notifier, Retry
from addons.approval.store import (
    APPROVED,
    CANCELLED,
    DENIED,
    PENDING,
    TIMEOUT,
    ApprovalError,
    ApprovalStore,
    PendingApproval,
)
from addons.config.schema import Where, expect_map, expect_str, expect_str_list, read_secret

log = logging.getLogger("agentgate.approval.slack")

VIA_SLACK = "slack"
SLACK_KEYS = {"signing_secret_env", "signing_secret_file", "bot_token_env", "bot_token_file",
              "channel", "users", "groups", "api_url"}
DEFAULT_API = "https://slack.com/api"
WINDOW_SECONDS = 300  # Slack's advice: refuse requests older than five minutes
MAX_CALLBACK_BYTES = 64 * 1024
ACTION_APPROVE, ACTION_DENY, ACTION_OPEN = "agentgate_approve", "agentgate_deny", "agentgate_open"
DENY_MODAL = "agentgate_deny_reason"
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER_RE = re.compile(r"[UW][A-Z0-9]{2,}")
_URL_RE = re.compile(r"^https?://[^\s/?#]+(?:/[^\s]*)?$")


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SlackConfig:
    signing_secret_env: str | None = None
    signing_secret_file: str | None = None
    bot_token_env: str | None = None
    bot_token_file: str | None = None
    channel: str | None = None
    users: dict[str, str] = field(default_factory=dict)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    api_url: str = DEFAULT_API

    def signing_secret(self) -> str | None:
        return read_secret(self.signing_secret_env, self.signing_secret_file)

    def bot_token(self) -> str | None:
        if not (self.bot_token_env or self.bot_token_file):
            return None
        return read_secret(self.bot_token_env, self.bot_token_file)

    def reviewer(self, slack_user: str) -> tuple[str, tuple[str, ...]] | None:
        """(subject, groups) of a Slack user, or None: unmapped users cannot decide."""
        sub = self.users.get(slack_user)
        if not sub:
            return None
        return sub, tuple(sorted(g for g, members in self.groups.items()
                                 if slack_user in members))


def _secret_source(d: dict[str, Any], where: Where, stem: str, required: bool
                   ) -> tuple[str | None, str | None]:
    env, file = d.get(f"{stem}_env"), d.get(f"{stem}_file")
    if env is not None and file is not None:
        raise where.error(f"give one of '{stem}_env' or '{stem}_file', not both")
    if env is None and file is None:
        if required:
            raise where.error(f"'{stem}_env' (environment variable) or '{stem}_file' "
                              "(secret file) is required")
        return None, None
    if env is not None:
        env = expect_str(env, where.child(f"{stem}_env"))
        if not _ENV_RE.fullmatch(env):
            raise where.child(f"{stem}_env").error(f"not an environment variable name: {env!r}")
        return env, None
    return None, expect_str(file, where.child(f"{stem}_file"))


def parse_slack(raw: Any, where: Where) -> SlackConfig:
    d = expect_map(raw, where, SLACK_KEYS)
    secret_env, secret_file = _secret_source(d, where, "signing_secret", True)
    token_env, token_file = _secret_source(d, where, "bot_token", False)
    channel = None
    if d.get("channel") is not None:
        channel = expect_str(d["channel"], where.child("channel")).strip()
    if (token_env or token_file) and not channel:
        raise where.child("channel").error("a bot token posts to a channel: name its id "
                                           "(e.g. C0123ABCD)")
    users: dict[str, str] = {}
    uw = where.child("users")
    for uid, sub in expect_map(d.get("users") or {}, uw).items():
        if not isinstance(uid, str) or not _USER_RE.fullmatch(uid):
            raise uw.error(f"{uid!r} is not a Slack user id (U… or W…)")
        users[uid] = expect_str(sub, uw.child(uid)).strip()
    groups: dict[str, tuple[str, ...]] = {}
    gw = where.child("groups")
    for group, members in expect_map(d.get("groups") or {}, gw).items():
        ids = expect_str_list(members, gw.child(str(group)))
        for uid in ids:
            if uid not in users:
                raise gw.child(str(group)).error(
                    f"{uid!r} is not in slack.users (map it to a reviewer subject first)")
        groups[str(group)] = ids
    api_url = DEFAULT_API
    if d.get("api_url") is not None:
        api_url = expect_str(d["api_url"], where.child("api_url")).strip().rstrip("/")
        if not _URL_RE.match(api_url):
            raise where.child("api_url").error("expected an http:// or https:// URL")
    return SlackConfig(signing_secret_env=secret_env, signing_secret_file=secret_file,
                       bot_token_env=token_env, bot_token_file=token_file, channel=channel,
                       users=users, groups=groups, api_url=api_url)


# ---------------------------------------------------------------- request signatures
class SignatureError(Exception):
    """A callback refused before anything in it was read; `reason` is safe to show."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    base = b"v0:" + timestamp.encode("ascii") + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


class ReplayGuard:
    """Signatures seen inside the window; bounded (oldest dropped first, and anything
    older than the window is refused by its timestamp anyway)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_time(self, signature: str, now: float) -> bool:
        while self._seen and next(iter(self._seen.values())) < now - 2 * WINDOW_SECONDS:
            self._seen.popitem(last=False)
        if signature in self._seen:
            return False
        self._seen[signature] = now
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        return True


def verify(secret: str | None, headers: dict[str, str], body: bytes, guard: ReplayGuard,
           now: float | None = None) -> None:
    """Raise SignatureError unless this is a fresh request signed with our secret."""
    if not secret:
        raise SignatureError("no Slack signing secret is configured")
    ts = headers.get("x-slack-request-timestamp", "")
    sig = headers.get("x-slack-signature", "")
    if not ts or not sig:
        raise SignatureError("missing X-Slack-Request-Timestamp or X-Slack-Signature")
    if not ts.isdigit() or len(ts) > 12:
        raise SignatureError("malformed X-Slack-Request-Timestamp")
    now = time.time() if now is None else now
    if abs(now - int(ts)) > WINDOW_SECONDS:
        raise SignatureError("request timestamp outside the 5 minute window")
    if not hmac.compare_digest(sign(secret, ts, body).encode(), sig.encode("utf-8", "replace")):
        raise SignatureError("signature does not match")
    if not guard.first_time(sig, now):
        raise SignatureError("request already seen (replay)")


# ---------------------------------------------------------------- messages
STATE_WORDS = {APPROVED: "Approved", DENIED: "Denied", TIMEOUT: "Timed out",
               CANCELLED: "Cancelled", PENDING: "Waiting for approval"}
STATE_EMOJI = {APPROVED: ":white_check_mark:", DENIED: ":no_entry:", TIMEOUT: ":alarm_clock:",
               CANCELLED: ":heavy_multiplication_x:", PENDING: ":hourglass:"}


def _esc(text: Any) -> str:
    """Slack mrkdwn escaping (&, <, >): user text must not become links or mentions."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def target_of(a: PendingApproval) -> str:
    w = a.what
    kind = w.get("kind") or "http"
    if kind == "sql":
        head = f"SQL on {w.get('upstream')}/{w.get('database')}"
    elif kind == "tool" and w.get("tool"):
        head = f"tool {w['tool']} on {w.get('upstream') or w.get('host')}"
    else:
        head = f"{kind} {w.get('method', '')} {w.get('url', '')}".strip()
    if w.get("model"):
        head += f" (model {w['model']})"
    return head


def outcome_line(a: PendingApproval) -> str:
    """One line saying what happened, with who and why, for the updated message."""
    if a.state == PENDING:
        if a.votes:
            return (f"{len(a.approvers)}/{a.spec.min_approvals} approvals so far: "
                    + ", ".join(f"{v.sub} via {v.via}" for v in a.votes))
        return f"needs {a.spec.min_approvals} approval(s) from {', '.join(a.spec.groups) or '-'}"
    if a.state in (APPROVED, DENIED):
        votes = [v for v in a.votes if v.decision == ("approve" if a.state == APPROVED
                                                       else "deny")]
        who = "; ".join(f"{v.sub} via {v.via}" + (f" ({v.reason})" if v.reason else "")
                        for v in votes)
        return f"{STATE_WORDS[a.state]} by {who}" if who else f"{STATE_WORDS[a.state]}"
    return f"{STATE_WORDS[a.state]}: {a.reason}"


def message(a: PendingApproval, link: str, now: float | None = None) -> dict[str, Any]:
    """The Block Kit message for an approval in its current state: buttons while pending,
    the outcome line once decided."""
    now = time.time() if now is None else now
    w = a.what
    title = f"{STATE_EMOJI.get(a.state, '')} {STATE_WORDS.get(a.state, a.state)}: {a.id}"
    fields = [f"*Rule:* {_esc(a.spec.rule)}" + (f" — {_esc(a.spec.message)}"
                                                  if a.spec.message else ""),
              f"*From:* {_esc(a.requester or 'an unauthenticated caller')}",
              f"*Request:* {_esc(target_of(a))}"]
    if w.get("summary"):
        fields.append(f"*Summary:* {_esc(w['summary'])}")
    elif w.get("sql"):  # a held statement (masked literals): its first 300 characters
        sql = " ".join(str(w["sql"]).split())
        fields.append(f"*SQL:* {_esc(sql[:300])}" + ("…" if len(sql) > 300 else ""))
    if w.get("session"):
        fields.append(f"*Session:* {_esc(w['session'])}")
    if a.state == PENDING:
        left = max(0, int(a.expires_at - now))
        fields.append(f"*Deadline:* {left}s ({a.spec.on_timeout} on timeout)")
    # the notification's plain text (phones, screen readers): state, id, rule, target
    # escaped like the blocks: a model or tool name is the agent's text, and `<!channel>`
    # in it would page everyone
    text = _esc(f"agentgate: {STATE_WORDS.get(a.state, a.state).lower()} {a.id} (rule "
                f"{a.spec.rule}) — {target_of(a)}")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_esc(title)}*"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(fields)}},
        {"type": "context", "elements": [{"type": "mrkdwn",
                                          "text": _esc(outcome_line(a))}]},
    ]
    buttons: list[dict[str, Any]] = []
    if a.state == PENDING:
        buttons += [
            {"type": "button", "action_id": ACTION_APPROVE, "style": "primary", "value": a.id,
             "text": {"type": "plain_text", "text": "Approve"}},
            {"type": "button", "action_id": ACTION_DENY, "style": "danger", "value": a.id,
             "text": {"type": "plain_text", "text": "Deny"}},
        ]
    if link:
        buttons.append({"type": "button", "action_id": ACTION_OPEN, "url": link, "value": a.id,
                        "text": {"type": "plain_text", "text": "Open in agentgate"}})
    if buttons:
        blocks.append({"type": "actions", "block_id": f"agentgate:{a.id}", "elements": buttons})
    return {"text": text, "blocks": blocks, "approval_id": a.id, "state": a.state,
            "rule": a.spec.rule, "link": link}


def deny_modal(a: PendingApproval, response_url: str) -> dict[str, Any]:
    """views.open payload asking for a deny reason (required, like on the page)."""
    return {
        "type": "modal", "callback_id": DENY_MODAL,
        "private_metadata": json.dumps({"id": a.id, "response_url": response_url}),
        "title": {"type": "plain_text", "text": "Deny request"},
        "submit": {"type": "plain_text", "text": "Deny"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn",
                                         "text": f"*{_esc(a.id)}* — {_esc(target_of(a))}"}},
            {"type": "input", "block_id": "reason", "label": {"type": "plain_text",
                                                              "text": "Reason"},
             "element": {"type": "plain_text_input", "action_id": "reason",
                         "max_length": 500}},
        ],
    }


def slack_ok(status: int, body: bytes) -> str | None:
    """Acceptance of a Slack Web API answer: HTTP 200 and {"ok": true}."""
    if status != 200:
        return f"HTTP {status}"
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return "answer is not JSON"
    if not isinstance(data, dict) or data.get("ok") is not True:
        err = data.get("error") if isinstance(data, dict) else None
        return f"Slack error {str(err)[:80]}" if err else "Slack answered ok=false"
    return None


# ---------------------------------------------------------------- posting and updating
@dataclass
class _Thread:
    """What we know about one approval's message."""

    channel: str | None = None
    ts: str | None = None
    response_url: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_state: str = PENDING
    last_votes: int = 0


class SlackMessenger:
    """Posts the message of a new hold and keeps it current. Every delivery is a task
    (never awaited by a held flow); updates of one approval go out in order."""

    MAX_THREADS = 5000

    def __init__(self, notifier: Notifier, config: Callable[[], SlackConfig | None],
                 webhook: Callable[[], str | None], retry: Callable[[], Retry],
                 link: Callable[[str], str]) -> None:
        self.notifier = notifier
        self.config = config
        self.webhook = webhook
        self.retry = retry
        self.link = link
        self._threads: OrderedDict[str, _Thread] = OrderedDict()

    def thread(self, approval_id: str) -> _Thread:
        t = self._threads.get(approval_id)
        if t is None:
            t = self._threads[approval_id] = _Thread()
            while len(self._threads) > self.MAX_THREADS:
                self._threads.popitem(last=False)
        return t

    def remember_response_url(self, approval_id: str, url: str) -> None:
        if url.startswith("https://") or url.startswith("http://"):
            self.thread(approval_id).response_url = url

    def _bot(self) -> tuple[SlackConfig, str] | None:
        cfg = self.config()
        if cfg is None or not cfg.channel:
            return None
        token = cfg.bot_token()
        return (cfg, token) if token else None

    def created(self, a: PendingApproval) -> asyncio.Task:
        return self.notifier.spawn(self._created(a))

    async def _created(self, a: PendingApproval) -> None:
        t = self.thread(a.id)
        async with t.lock:
            msg = message(a, self.link(a.id))
            # the token and the webhook URL may live in files: read them off the event loop
            bot = await asyncio.to_thread(self._bot)
            if bot is not None:
                cfg, token = bot
                body = await self.notifier.deliver(
                    f"{cfg.api_url}/chat.postMessage", dict(msg, channel=cfg.channel),
                    self.retry(), still_wanted=lambda: not a.decided, label=a.id,
                    headers={"Authorization": f"Bearer {token}"}, check=slack_ok)
                if body:
                    data = json.loads(body)
                    t.channel, t.ts = data.get("channel"), data.get("ts")
                return
            url = await asyncio.to_thread(self.webhook)
            if url:
                await self.notifier.deliver(url, msg, self.retry(),
                                            still_wanted=lambda: not a.decided, label=a.id)

    def changed(self, a: PendingApproval) -> asyncio.Task | None:
        """A vote or a decision: bring the message up to date (once per change)."""
        t = self.thread(a.id)
        if (a.state, len(a.votes)) == (t.last_state, t.last_votes):
            return None
        t.last_state, t.last_votes = a.state, len(a.votes)
        return self.notifier.spawn(self._changed(a, t))

    async def _changed(self, a: PendingApproval, t: _Thread) -> None:
        async with t.lock:  # after the post of the message (we need its ts)
            msg = message(a, self.link(a.id))
            bot = await asyncio.to_thread(self._bot)
            if bot is not None and t.channel and t.ts:
                cfg, token = bot
                await self.notifier.deliver(
                    f"{cfg.api_url}/chat.update", dict(msg, channel=t.channel, ts=t.ts),
                    self.retry(), label=a.id, headers={"Authorization": f"Bearer {token}"},
                    check=slack_ok)
            elif t.response_url:
                await self.notifier.deliver(t.response_url,
                                            dict(msg, replace_original=True), self.retry(),
                                            label=a.id)
            elif a.decided and (url := await asyncio.to_thread(self.webhook)):
                # an incoming webhook gives no handle on its message: say it in a new one
                await self.notifier.deliver(url, msg, self.retry(), label=a.id)
        if a.decided:
            self._threads.pop(a.id, None)

    def ephemeral(self, response_url: str, text: str) -> None:
        """A note only the clicking user sees (why their click did nothing)."""
        if response_url:
            self.notifier.spawn(self.notifier.deliver(
                response_url, {"response_type": "ephemeral", "replace_original": False,
                               "text": _esc(text)}, self.retry(), label="slack"))


# ---------------------------------------------------------------- the interactive callback
class SlackInteractions:
    """Verifies and acts on Slack's interactive callbacks. `handle` never raises."""

    def __init__(self, store: ApprovalStore, config: Callable[[], SlackConfig | None],
                 messenger: SlackMessenger,
                 on_vote: Callable[[PendingApproval], None] = lambda _a: None) -> None:
        self.store = store
        self.config = config
        self.messenger = messenger
        self.on_vote = on_vote
        self.guard = ReplayGuard()

    async def handle(self, headers: dict[str, str], body: bytes
                     ) -> tuple[int, dict[str, Any] | None]:
        """(status, JSON answer or None for an empty 200)."""
        cfg = self.config()
        if cfg is None:
            return 404, {"error": {"code": "slack_off",
                                   "message": "Slack is not configured (approvals.slack)"}}
        if len(body) > MAX_CALLBACK_BYTES:
            return 413, {"error": {"code": "body_too_large", "message": "callback too large"}}
        secret = await asyncio.to_thread(cfg.signing_secret)  # may read a secret file
        try:
            verify(secret, {k.lower(): v for k, v in headers.items()}, body, self.guard)
        except SignatureError as e:
            log.warning("agentgate: Slack callback refused: %s", e.reason)
            return 401, {"error": {"code": "bad_signature", "message": e.reason}}
        try:
            form = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=False)
            payload = json.loads(form.get("payload", [""])[0])
            if not isinstance(payload, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            return 400, {"error": {"code": "bad_payload",
                                   "message": "expected a form field 'payload' with JSON"}}
        try:
            return await self._act(cfg, payload)
        except Exception as e:  # noqa: BLE001 - answer Slack, keep serving
            log.error("agentgate: Slack callback failed (%s)", type(e).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return 500, {"error": {"code": "internal_error", "message": "internal error"}}

    async def _act(self, cfg: SlackConfig, p: dict[str, Any]
                   ) -> tuple[int, dict[str, Any] | None]:
        user = p.get("user") if isinstance(p.get("user"), dict) else {}
        uid = str(user.get("id") or "")
        kind = p.get("type")
        response_url = str(p.get("response_url") or "")
        if kind == "block_actions":
            actions = p.get("actions") if isinstance(p.get("actions"), list) else []
            act = actions[0] if actions and isinstance(actions[0], dict) else {}
            action_id, approval_id = act.get("action_id"), str(act.get("value") or "")
            if action_id == ACTION_OPEN or action_id not in (ACTION_APPROVE, ACTION_DENY):
                return 200, None  # the link button: Slack wants an acknowledgement
            if response_url:
                self.messenger.remember_response_url(approval_id, response_url)
            return await self._decide(cfg, uid, action_id, approval_id, response_url,
                                      trigger_id=str(p.get("trigger_id") or ""))
        if kind == "view_submission":
            view = p.get("view") if isinstance(p.get("view"), dict) else {}
            if view.get("callback_id") != DENY_MODAL:
                return 200, None
            try:
                meta = json.loads(view.get("private_metadata") or "{}")
                reason = (view["state"]["values"]["reason"]["reason"]["value"] or "").strip()
            except (ValueError, KeyError, TypeError):
                return 400, {"error": {"code": "bad_payload", "message": "malformed modal"}}
            if not reason:
                return 200, {"response_action": "errors",
                             "errors": {"reason": "A reason is required to deny."}}
            status, answer = await self._decide(cfg, uid, ACTION_DENY,
                                                str(meta.get("id") or ""),
                                                str(meta.get("response_url") or ""),
                                                reason=reason)
            if answer and answer.get("error"):  # show why in the modal instead of closing
                return 200, {"response_action": "errors",
                             "errors": {"reason": answer["error"]["message"]}}
            return 200, None
        return 200, None

    async def _decide(self, cfg: SlackConfig, uid: str, action_id: str, approval_id: str,
                response_url: str, *, trigger_id: str = "", reason: str | None = None
                ) -> tuple[int, dict[str, Any] | None]:
        who = cfg.reviewer(uid)
        if who is None:
            log.warning("agentgate: Slack user %s is not mapped to a reviewer (slack.users); "
                        "click on %s ignored", uid or "?", approval_id)
            return self._refused(response_url, 403, "slack_user_unmapped",
                                 "your Slack user is not mapped to an agentgate reviewer")
        sub, groups = who
        a = self.store.get(approval_id)
        if a is None:
            return self._refused(response_url, 404, "approval_not_found",
                                 f"no approval {approval_id!r}")
        try:
            if action_id == ACTION_APPROVE:
                # the store's async votes: a shared store records them in Postgres first
                a = await self.store.aapprove(approval_id, sub, groups, via=VIA_SLACK)
            elif reason is None and trigger_id and self._open_modal(cfg, a, sub, groups,
                                                                    trigger_id, response_url):
                return 200, None  # the modal's submission decides
            else:
                a = await self.store.adeny(approval_id, sub, groups,
                                           reason or f"denied in Slack by {sub}", via=VIA_SLACK)
        except ApprovalError as e:
            return self._refused(response_url, e.status, e.code, e.message)
        log.info("agentgate: approval %s: %s by %s via Slack (%d/%d approvals, state %s)",
                 a.id, "approve" if action_id == ACTION_APPROVE else "deny", sub,
                 len(a.approvers), a.spec.min_approvals, a.state)
        self.on_vote(a)
        return 200, None

    def _open_modal(self, cfg: SlackConfig, a: PendingApproval, sub: str,
                    groups: tuple[str, ...], trigger_id: str, response_url: str) -> bool:
        token = cfg.bot_token()
        if not token:
            return False
        # a reviewer outside the group learns it now, not after typing a reason
        if not self.store.may_review(a, groups):
            raise ApprovalError(403, "reviewer_not_in_group",
                                f"reviewer {sub!r} is not in an approver group of rule "
                                f"{a.spec.rule!r}")
        if a.decided:
            raise ApprovalError(409, "approval_decided", f"approval {a.id} is already {a.state}")
        self.messenger.notifier.spawn(self.messenger.notifier.deliver(
            f"{cfg.api_url}/views.open",
            {"trigger_id": trigger_id, "view": deny_modal(a, response_url)},
            Retry(retries=0, timeout=2.5), label=a.id,  # a trigger_id lives 3 seconds
            headers={"Authorization": f"Bearer {token}"}, check=slack_ok))
        return True

    def _refused(self, response_url: str, status: int, code: str, message_: str
                 ) -> tuple[int, dict[str, Any]]:
        self.messenger.ephemeral(response_url, f"agentgate: not done — {message_}")
        # 200 to Slack all the same: a non-2xx shows the clicking user a generic error
        return 200, {"error": {"code": code, "message": message_, "status": status}}


class SlackActionsHandler(tornado.web.RequestHandler):
    """POST /slack/actions, for the reviewers' tornado app (mount with
    `(r"/slack/actions", SlackActionsHandler, {"interactions": …})`)."""

    def initialize(self, interactions: SlackInteractions) -> None:
        self.interactions = interactions

    def check_xsrf_cookie(self) -> None:
        """Slack signs its requests; it has no cookie. The signature is the check."""

    async def post(self) -> None:
        status, answer = await self.interactions.handle(dict(self.request.headers),
                                                        self.request.body or b"")
        self.set_status(status)
        self.set_header("Cache-Control", "no-store")
        if answer is not None:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(answer))
        else:
            self.finish()

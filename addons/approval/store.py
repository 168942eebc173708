"""Pending approvals and reviewers' votes: the pure state machine behind held requests.

No mitmproxy and no asyncio here. The approval addon asks this store to open an approval
when it holds a flow, the reviewers' API and the mitmweb commands cast votes, and the
addon's waiting hook reads the outcome. Everything about *who may decide* lives here:

- a reviewer must be in one of the rule's approver groups (an empty list means nobody
  can approve through the API: fail closed);
- nobody may approve their own request (same `sub`, whatever the issuer: the stricter
  reading);
- `min_approvals` counts distinct reviewers; a second vote by the same reviewer is a 409;
- one deny by an eligible reviewer decides (a veto), whatever approvals came before;
- the mitmweb operator votes only when the rule says `allow_mitmweb`, and then counts as
  one distinct reviewer ("mitmweb-operator"); the operator may always deny.

States: pending -> approved | denied | timeout | cancelled (client went away, gateway
stopped, flow killed). A decided approval is kept for a while so that a late vote gets a
clear 409 instead of a 404. Swapping this class for a shared store (several gateway
replicas) is the one change needed to let any replica release a hold.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PENDING, APPROVED, DENIED, TIMEOUT, CANCELLED = (
    "pending", "approved", "denied", "timeout", "cancelled")
STATES = (PENDING, APPROVED, DENIED, TIMEOUT, CANCELLED)
OPERATOR = "mitmweb-operator"
VIA_API, VIA_MITMWEB = "api", "mitmweb"
ON_TIMEOUT = ("deny", "allow")
MAX_REASON = 500


class ApprovalError(Exception):
    """A refused store operation, shaped for the API: HTTP status, code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class ApprovalSpec:
    """What the rule asks for (from the policy decision, defaults from `approvals`)."""

    rule: str
    groups: tuple[str, ...]
    min_approvals: int = 1
    timeout: float = 900.0
    on_timeout: str = "deny"
    allow_mitmweb: bool = False
    message: str = ""


@dataclass(frozen=True)
class Vote:
    sub: str
    decision: str  # "approve" | "deny"
    at: float
    via: str = VIA_API
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"sub": self.sub, "decision": self.decision, "at": self.at, "via": self.via,
                "reason": self.reason}


@dataclass
class PendingApproval:
    """One held request. Mutated only by ApprovalStore."""

    id: str
    spec: ApprovalSpec
    requester: str | None
    what: dict[str, Any]
    preview: str
    preview_truncated: bool
    requested_at: float
    expires_at: float
    state: str = PENDING
    votes: list[Vote] = field(default_factory=list)
    reason: str = ""
    decided_at: float | None = None
    # notes for mitmweb and the log (e.g. "mitmweb resume ignored"); not part of the record
    notes: list[str] = field(default_factory=list)
    # whose request it is: the verified issuer AND subject (`id:<iss>|<sub>`), else the
    # client's address; an agent sees its own requests by this, never by `requester` (the
    # subject alone: the same sub from another trusted issuer is another agent)
    owner: str = ""

    @property
    def approvers(self) -> list[str]:
        return [v.sub for v in self.votes if v.decision == "approve"]

    @property
    def decided(self) -> bool:
        return self.state != PENDING

    def metadata(self) -> dict[str, Any]:
        """The flow.metadata["approval"] record (tnetstring-safe: str/float/list/None)."""
        return {
            "id": self.id,
            "state": self.state,
            "rule": self.spec.rule,
            "requester": self.requester,
            "approvers": self.approvers,
            "denied_by": next((v.sub for v in self.votes if v.decision == "deny"), None),
            "min_approvals": self.spec.min_approvals,
            "reason": self.reason,
            "requested_at": self.requested_at,
            "decided_at": self.decided_at,
            # every vote (who, via, when, reason): the approver's reason is kept too
            "votes": [v.to_dict() for v in self.votes],
        }

    def public(self, now: float | None = None) -> dict[str, Any]:
        """What reviewers see in the API (masked preview, no credentials)."""
        now = time.time() if now is None else now
        return {
            "id": self.id,
            "state": self.state,
            "rule": self.spec.rule,
            "message": self.spec.message,
            "requester": self.requester,
            "what": dict(self.what),
            "preview": self.preview,
            "preview_truncated": self.preview_truncated,
            "requested_at": self.requested_at,
            "age_seconds": round(max(0.0, (self.decided_at or now) - self.requested_at), 3),
            "expires_at": self.expires_at,
            "expires_in_seconds": round(max(0.0, self.expires_at - now), 3)
            if not self.decided else 0.0,
            "on_timeout": self.spec.on_timeout,
            "groups": list(self.spec.groups),
            "min_approvals": self.spec.min_approvals,
            "approvals": len(self.approvers),
            "votes": [v.to_dict() for v in self.votes],
            "reason": self.reason,
            "decided_at": self.decided_at,
        }


def clean_reason(text: Any) -> str:
    """A reviewer's reason: a short single-line string (it reaches the agent's error)."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ApprovalError(400, "bad_reason", "reason must be a string")
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text[:MAX_REASON]


def new_id() -> str:
    return "ap-" + secrets.token_hex(6)


class ApprovalStore:
    """All approvals of this gateway, in memory.

    `on_decided(approval)` is called after every transition out of `pending` (the addon
    uses it to release the held flow).
    """

    def __init__(self, *, max_pending: int = 1000, max_pending_per_identity: int = 20,
                 keep_decided: int = 1000, clock: Callable[[], float] = time.time,
                 id_factory: Callable[[], str] = new_id) -> None:
        self.max_pending = max_pending
        # Fairness: one agent's holds must not fill the global queue (every other agent's
        # approvable request would get 429). Counted per owner, see `create`.
        self.max_pending_per_identity = max_pending_per_identity
        self._owned: dict[str, int] = {}
        self._owner_of: dict[str, str] = {}
        self.keep_decided = keep_decided
        self.clock = clock
        self.id_factory = id_factory
        self.on_decided: Callable[[PendingApproval], None] | None = None
        # Watchers of every change (opened, voted, decided): the reviewers' page pushes
        # live updates from here. Called synchronously; a watcher must not raise or block.
        self.listeners: list[Callable[[PendingApproval], None]] = []
        self._pending: dict[str, PendingApproval] = {}
        self._decided: OrderedDict[str, PendingApproval] = OrderedDict()

    # ------------------------------------------------------------ reading
    def get(self, approval_id: str) -> PendingApproval | None:
        return self._pending.get(approval_id) or self._decided.get(approval_id)

    def pending(self) -> list[PendingApproval]:
        return sorted(self._pending.values(), key=lambda a: a.requested_at)

    def __len__(self) -> int:
        return len(self._pending)

    def decided(self) -> list[PendingApproval]:
        """Recently decided approvals (at most `keep_decided`), newest decision first."""
        return sorted(self._decided.values(), key=lambda a: a.decided_at or 0.0, reverse=True)

    def changed(self, a: PendingApproval) -> None:
        """Tell every listener that `a` changed; a failing listener is dropped, never fatal
        (the store's own transitions must not depend on who watches)."""
        for fn in list(self.listeners):
            try:
                fn(a)
            except Exception:  # noqa: BLE001 - a broken watcher cannot stop a decision
                self.listeners.remove(fn)

    @staticmethod
    def may_review(a: PendingApproval, groups: tuple[str, ...] | list[str]) -> bool:
        return bool(set(a.spec.groups) & set(groups))

    def visible_to(self, owner: str, groups: tuple[str, ...] | list[str]
                   ) -> list[PendingApproval]:
        """Pending approvals a reviewer may act on, plus the caller's own requests (`owner`:
        the caller as create's `owner` names it)."""
        return [a for a in self.pending()
                if self.may_review(a, groups) or (a.owner != "" and a.owner == owner)]

    # ------------------------------------------------------------ writing
    def pending_of(self, owner: str) -> int:
        """How many approvals `owner` has pending right now."""
        return self._owned.get(owner, 0)

    def create(self, spec: ApprovalSpec, requester: str | None, what: dict[str, Any],
               preview: str = "", preview_truncated: bool = False,
               now: float | None = None, owner: str | None = None) -> PendingApproval:
        """Open an approval. `owner` is whose quota it counts against (the addon passes the
        verified issuer + subject, or the client address when identity is off); it defaults
        to the requester, and requests with neither share one anonymous quota."""
        if spec.min_approvals < 1:
            raise ValueError("min_approvals must be >= 1")
        if spec.on_timeout not in ON_TIMEOUT:
            raise ValueError(f"on_timeout must be one of {ON_TIMEOUT}")
        owner = owner if owner is not None else (requester or "")
        # The per-identity cap is checked first: an agent at its own cap is told so (and
        # does not learn how busy the global queue is).
        if self._owned.get(owner, 0) >= self.max_pending_per_identity:
            raise ApprovalError(429, "approval_quota_exceeded",
                                "too many of your requests are awaiting approval "
                                f"({self.max_pending_per_identity} per identity)")
        if len(self._pending) >= self.max_pending:
            raise ApprovalError(429, "approval_queue_full",
                                f"too many requests awaiting approval ({self.max_pending})")
        now = self.clock() if now is None else now
        approval_id = self.id_factory()
        while approval_id in self._pending or approval_id in self._decided:
            approval_id = self.id_factory()
        a = PendingApproval(id=approval_id, spec=spec, requester=requester, what=dict(what),
                            preview=preview, preview_truncated=preview_truncated,
                            requested_at=now, expires_at=now + spec.timeout, owner=owner)
        self._pending[a.id] = a
        self._owner_of[a.id] = owner
        self._owned[owner] = self._owned.get(owner, 0) + 1
        self.changed(a)
        return a

    # Callers on the event loop open holds and record API/page votes through these: a
    # shared store (pgstore.PgApprovalStore) reaches its database first; here they are the
    # synchronous methods.
    shared = False

    @property
    def ready(self) -> bool:
        return True

    def health(self) -> dict[str, Any]:
        return {"kind": "memory", "ready": True}

    async def acreate(self, spec: ApprovalSpec, requester: str | None, what: dict[str, Any],
                      preview: str = "", preview_truncated: bool = False,
                      now: float | None = None, owner: str | None = None) -> PendingApproval:
        return self.create(spec, requester, what, preview, preview_truncated, now, owner)

    async def aopen(self, spec: ApprovalSpec, requester: str | None, what: dict[str, Any],
                    preview: str = "", preview_truncated: bool = False, *,
                    owner: str | None = None, intent: str | None = None
                    ) -> tuple[PendingApproval, bool]:
        """(approval, joined): a new hold; a shared store may instead return the pending hold
        of the same intent that another replica opened (joined=True)."""
        return self.create(spec, requester, what, preview, preview_truncated,
                           owner=owner), False

    async def aapprove(self, approval_id: str, sub: str, groups: Any = (), *,
                       via: str = VIA_API, reason: Any = None) -> PendingApproval:
        return self.approve(approval_id, sub, groups, via=via, reason=reason)

    async def adeny(self, approval_id: str, sub: str, groups: Any = (), reason: Any = None,
                    *, via: str = VIA_API) -> PendingApproval:
        return self.deny(approval_id, sub, groups, reason, via=via)

    def _open(self, approval_id: str) -> PendingApproval:
        a = self.get(approval_id)
        if a is None:
            raise ApprovalError(404, "approval_not_found", f"no approval {approval_id!r}")
        if a.decided:
            raise ApprovalError(409, "approval_decided", f"approval {a.id} is already {a.state}")
        return a

    def _check_reviewer(self, a: PendingApproval, sub: str, groups: tuple[str, ...] | list[str],
                        via: str) -> None:
        if via == VIA_MITMWEB:
            return
        if not sub:
            raise ApprovalError(403, "reviewer_unknown", "reviewer token has no subject")
        if not self.may_review(a, groups):
            wanted = ", ".join(a.spec.groups) or "none configured"
            raise ApprovalError(403, "reviewer_not_in_group",
                                f"reviewer {sub!r} is not in an approver group of rule "
                                f"{a.spec.rule!r} ({wanted})")

    def approve(self, approval_id: str, sub: str, groups: tuple[str, ...] | list[str] = (),
                *, via: str = VIA_API, reason: Any = None,
                now: float | None = None) -> PendingApproval:
        a = self._open(approval_id)
        if via == VIA_MITMWEB:
            if not a.spec.allow_mitmweb:
                raise ApprovalError(403, "mitmweb_not_allowed",
                                    f"rule {a.spec.rule!r} does not allow approval from mitmweb")
            sub = OPERATOR
        self._check_reviewer(a, sub, groups, via)
        if a.requester is not None and sub == a.requester:
            raise ApprovalError(403, "self_approval",
                                "a reviewer may not approve their own request")
        if any(v.sub == sub for v in a.votes):
            raise ApprovalError(409, "already_voted",
                                f"{sub!r} already voted on approval {a.id}")
        now = self.clock() if now is None else now
        a.votes.append(Vote(sub, "approve", now, via, clean_reason(reason)))
        if len(a.approvers) >= a.spec.min_approvals:
            self._decide(a, APPROVED, "approved by " + ", ".join(a.approvers), now)
        else:
            self.changed(a)
        return a

    def deny(self, approval_id: str, sub: str, groups: tuple[str, ...] | list[str] = (),
             reason: Any = None, *, via: str = VIA_API,
             now: float | None = None) -> PendingApproval:
        a = self._open(approval_id)
        if via == VIA_MITMWEB:
            sub = OPERATOR  # denying is always safe: the operator may always refuse
        self._check_reviewer(a, sub, groups, via)
        text = clean_reason(reason) or "no reason given"
        now = self.clock() if now is None else now
        a.votes.append(Vote(sub, "deny", now, via, text))
        self._decide(a, DENIED, text, now)
        return a

    def expire(self, approval_id: str, now: float | None = None) -> PendingApproval:
        a = self._open(approval_id)
        now = self.clock() if now is None else now
        verdict = "request forwarded" if a.spec.on_timeout == "allow" else "request refused"
        self._decide(a, TIMEOUT,
                     f"no decision within {a.spec.timeout:g}s; {verdict}", now)
        return a

    def expire_due(self, now: float | None = None) -> list[PendingApproval]:
        """Expire every approval past its deadline (for a sweeper / a shared store)."""
        now = self.clock() if now is None else now
        return [self.expire(a.id, now) for a in list(self._pending.values())
                if a.expires_at <= now]

    def cancel(self, approval_id: str, reason: str, now: float | None = None
               ) -> PendingApproval | None:
        """Close an approval nobody can decide any more; None if it was already decided."""
        a = self.get(approval_id)
        if a is None or a.decided:
            return None
        self._decide(a, CANCELLED, reason, self.clock() if now is None else now)
        return a

    def _decide(self, a: PendingApproval, state: str, reason: str, now: float) -> None:
        a.state = state
        a.reason = reason
        a.decided_at = now
        if self._pending.pop(a.id, None) is not None:
            owner = self._owner_of.pop(a.id, "")
            left = self._owned.get(owner, 0) - 1
            if left > 0:
                self._owned[owner] = left
            else:
                self._owned.pop(owner, None)
        self._decided[a.id] = a
        while len(self._decided) > self.keep_decided:
            self._decided.popitem(last=False)
        if self.on_decided is not None:
            self.on_decided(a)
        self.changed(a)

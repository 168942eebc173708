"""Pure tests of the approval store and the `approvals` rules section."""

from __future__ import annotations

import itertools
import json
import textwrap
import time
from pathlib import Path

import pytest

from addons.approval.config import ApprovalsConfig, parse_listen
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
)
from addons.config.loader import load_rules
from addons.config.schema import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(**kw) -> tuple[ApprovalStore, Clock, list]:
    clock = Clock()
    ids = (f"ap-{i}" for i in itertools.count(1))
    store = ApprovalStore(clock=clock, id_factory=lambda: next(ids), **kw)
    decided: list = []
    store.on_decided = decided.append
    return store, clock, decided


SPEC = ApprovalSpec(rule="bulk-synthetic", groups=("reviewers", "security"), timeout=60)
SPEC_2 = ApprovalSpec(rule="bulk-two", groups=("reviewers",), min_approvals=2, timeout=60)


def test_single_approval_by_group_member() -> None:
    store, clock, decided = make_store()
    a = store.create(SPEC, "agent-1", {"method": "POST"}, "preview")
    assert a.state == PENDING and store.pending() == [a]
    clock.now += 5
    store.approve(a.id, "alice", ["reviewers"], reason="ok")
    assert a.state == APPROVED and decided == [a]
    meta = a.metadata()
    assert meta["approvers"] == ["alice"] and meta["state"] == "approved"
    assert meta["requested_at"] == 1000.0 and meta["decided_at"] == 1005.0
    assert meta["requester"] == "agent-1" and meta["rule"] == "bulk-synthetic"
    assert store.pending() == [] and store.get(a.id) is a


def test_reviewer_outside_group_is_refused() -> None:
    store, _, decided = make_store()
    a = store.create(SPEC, "agent-1", {})
    with pytest.raises(ApprovalError) as e:
        store.approve(a.id, "mallory", ["developers"])
    assert e.value.status == 403 and e.value.code == "reviewer_not_in_group"
    with pytest.raises(ApprovalError) as e:
        store.deny(a.id, "mallory", ["developers"], "no")
    assert e.value.status == 403
    assert a.state == PENDING and decided == []


def test_requester_may_not_approve_own_request() -> None:
    store, _, _ = make_store()
    a = store.create(SPEC, "alice", {})
    with pytest.raises(ApprovalError) as e:
        store.approve(a.id, "alice", ["reviewers"])
    assert e.value.status == 403 and e.value.code == "self_approval"
    assert a.state == PENDING and a.votes == []


def test_two_of_n_counts_distinct_reviewers() -> None:
    store, _, decided = make_store()
    a = store.create(ApprovalSpec(rule="r", groups=("reviewers",), min_approvals=2),
                     "agent-1", {})
    store.approve(a.id, "alice", ["reviewers"])
    assert a.state == PENDING
    with pytest.raises(ApprovalError) as e:
        store.approve(a.id, "alice", ["reviewers"])
    assert e.value.status == 409 and e.value.code == "already_voted"
    assert a.state == PENDING and decided == []
    store.approve(a.id, "bob", ["reviewers"])
    assert a.state == APPROVED and a.approvers == ["alice", "bob"] and decided == [a]


def test_one_deny_vetoes_and_late_votes_conflict() -> None:
    store, _, _ = make_store()
    a = store.create(ApprovalSpec(rule="r", groups=("reviewers",), min_approvals=2),
                     "agent-1", {})
    store.approve(a.id, "alice", ["reviewers"])
    store.deny(a.id, "bob", ["reviewers"], "too many records\x00\n please")
    assert a.state == DENIED and a.reason == "too many records   please"
    assert a.metadata()["denied_by"] == "bob" and a.metadata()["approvers"] == ["alice"]
    with pytest.raises(ApprovalError) as e:
        store.approve(a.id, "carol", ["reviewers"])
    assert e.value.status == 409 and e.value.code == "approval_decided"


def test_unknown_id_is_404_and_empty_groups_mean_nobody() -> None:
    store, _, _ = make_store()
    with pytest.raises(ApprovalError) as e:
        store.approve("ap-nope", "alice", ["reviewers"])
    assert e.value.status == 404
    a = store.create(ApprovalSpec(rule="r", groups=()), "agent-1", {})
    with pytest.raises(ApprovalError) as e:
        store.approve(a.id, "alice", ["reviewers", "admins"])
    assert e.value.code == "reviewer_not_in_group"


def test_timeout_and_expire_due() -> None:
    store, clock, decided = make_store()
    a = store.create(SPEC, "agent-1", {})
    b = store.create(ApprovalSpec(rule="r2", groups=("x",), timeout=600, on_timeout="allow"),
                     None, {})
    clock.now += 61
    assert store.expire_due() == [a]
    assert a.state == TIMEOUT and "refused" in a.reason and b.state == PENDING
    store.expire(b.id)
    assert b.state == TIMEOUT and "forwarded" in b.reason
    assert decided == [a, b]


def test_mitmweb_operator_only_when_rule_allows() -> None:
    store, _, _ = make_store()
    a = store.create(SPEC, "agent-1", {})
    with pytest.raises(ApprovalError) as e:
        store.approve(a.id, "whoever", via=VIA_MITMWEB)
    assert e.value.code == "mitmweb_not_allowed"
    b = store.create(ApprovalSpec(rule="r", groups=("g",), min_approvals=2,
                                  allow_mitmweb=True), "agent-1", {})
    store.approve(b.id, "ignored", via=VIA_MITMWEB)
    assert b.approvers == [OPERATOR] and b.state == PENDING  # one vote of two
    store.approve(b.id, "alice", ["g"])
    assert b.state == APPROVED
    # the operator may always deny
    store.deny(a.id, "x", reason="nope", via=VIA_MITMWEB)
    assert a.state == DENIED and a.metadata()["denied_by"] == OPERATOR


def test_queue_limit_cancel_and_visibility() -> None:
    store, _, _ = make_store(max_pending=2)
    a = store.create(SPEC, "agent-1", {})
    b = store.create(ApprovalSpec(rule="other", groups=("finance",)), "agent-2", {})
    with pytest.raises(ApprovalError) as e:
        store.create(SPEC, "agent-3", {})
    assert e.value.status == 429
    assert [x.id for x in store.visible_to("alice", ["reviewers"])] == [a.id]
    assert [x.id for x in store.visible_to("agent-2", [])] == [b.id]  # own request
    assert store.cancel(a.id, "client disconnected") is a and a.state == CANCELLED
    assert store.cancel(a.id, "again") is None
    store.create(SPEC, "agent-3", {})  # room again


def test_decided_history_is_bounded() -> None:
    store, _, _ = make_store(keep_decided=3)
    ids = []
    for _ in range(5):
        a = store.create(SPEC, "agent-1", {})
        store.deny(a.id, "alice", ["reviewers"], "no")
        ids.append(a.id)
    assert store.get(ids[0]) is None and store.get(ids[-1]) is not None


def test_public_view_has_what_reviewers_need() -> None:
    store, clock, _ = make_store()
    a = store.create(SPEC, "agent-1", {"method": "POST", "model": "gpt-4o"}, "{\"n\": 50}",
                     True)
    clock.now += 10
    v = a.public(clock.now)
    assert v["age_seconds"] == 10 and v["expires_in_seconds"] == 50
    assert v["what"]["model"] == "gpt-4o" and v["preview"] == "{\"n\": 50}"
    assert v["preview_truncated"] is True and v["votes"] == [] and v["approvals"] == 0


# ---------------------------------------------------------------- config
def write_rules(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.yaml").write_text(textwrap.dedent(text))
    return tmp_path


def test_config_defaults(tmp_path: Path) -> None:
    rules = load_rules(write_rules(tmp_path, "upstreams: []\n"))
    cfg = rules.approvals
    assert cfg == ApprovalsConfig()
    assert cfg.listen == ("127.0.0.1", 8081) and cfg.default_timeout == 300
    assert cfg.allow_mitmweb is True
    assert cfg.link("ap-1") == "http://127.0.0.1:8081/approvals/ap-1"
    assert "API http://127.0.0.1:8081" in cfg.describe()


def test_config_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    rules = load_rules(write_rules(tmp_path, f"""\
        approvals:
          listen: "[::1]:9000"
          link_base: https://gw.internal:8443/
          default_timeout: 30
          on_timeout: allow
          timeout_status: 408
          allow_mitmweb: false
          max_pending: 10
          preview_chars: 100
          notify:
            url_env: SLACK_URL
            retries: 2
            backoff: 0.5
            max_backoff: 4
            timeout: 3
            ca_file: {ca}
        """))
    cfg = rules.approvals
    assert cfg.listen == ("::1", 9000) and cfg.on_timeout == "allow"
    assert cfg.link("ap-1") == "https://gw.internal:8443/approvals/ap-1"
    assert cfg.timeout_status == 408 and not cfg.allow_mitmweb and cfg.max_pending == 10
    n = cfg.notify
    assert n.retries == 2 and n.backoff == 0.5 and n.ca_file == str(ca)
    monkeypatch.delenv("SLACK_URL", raising=False)
    assert n.resolve() is None
    monkeypatch.setenv("SLACK_URL", "https://hooks.slack.com/services/T/B/secret")
    assert n.resolve().endswith("/secret")
    assert "secret" not in cfg.describe() and "$SLACK_URL" in cfg.describe()


@pytest.mark.parametrize(("body", "key", "reason"), [
    ("listen: nowhere", "approvals.listen", "host:port"),
    ("listen: 1.2.3.4:99999", "approvals.listen", "out of range"),
    ("default_timeout: 0", "approvals.default_timeout", ">="),
    ("on_timeout: maybe", "approvals.on_timeout", "deny or allow"),
    ("timeout_status: 500", "approvals.timeout_status", "403 or 408"),
    ("allow_mitmweb: yes please", "approvals.allow_mitmweb", "true or false"),
    ("notify: {retries: 3}", "approvals.notify", "exactly one"),
    ("notify: {url: 'ftp://x'}", "approvals.notify.url", "http"),
    ("notify: {url: 'http://x', url_env: Y}", "approvals.notify", "exactly one"),
    ("notify: {url_env: '1BAD'}", "approvals.notify.url_env", "environment variable"),
    ("notify: {url: 'http://x', ca_file: /nonexistent.pem}", "approvals.notify.ca_file",
     "no such file"),
    ("notify: {url: 'http://x', backoff: 10, max_backoff: 1}", "approvals.notify.max_backoff",
     ">= backoff"),
    ("bogus: 1", "approvals.bogus", "unknown key"),
])
def test_config_errors_name_file_and_key(tmp_path: Path, body: str, key: str,
                                         reason: str) -> None:
    write_rules(tmp_path, "approvals:\n  " + body + "\n")
    with pytest.raises(ConfigError) as e:
        load_rules(tmp_path)
    assert e.value.file.endswith("a.yaml") and e.value.key == key
    assert reason in e.value.reason


def test_listen_off_and_parse() -> None:
    assert parse_listen("off") is None and parse_listen("") is None
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    with pytest.raises(ValueError):
        parse_listen("8081")


# ---------------------------------------------------------------- fairness (issue 11, class 11)
def test_per_identity_cap_leaves_room_for_other_identities() -> None:
    store, clock, decided = make_store(max_pending=10, max_pending_per_identity=3)
    spec = ApprovalSpec("r", ("reviewers",))
    mine = [store.create(spec, "hog", {}, owner="id:iss|hog") for _ in range(3)]
    with pytest.raises(ApprovalError) as ei:
        store.create(spec, "hog", {}, owner="id:iss|hog")
    assert ei.value.status == 429 and ei.value.code == "approval_quota_exceeded"
    # another identity is still held, and so is the same `sub` from another issuer
    store.create(spec, "other", {}, owner="id:iss|other")
    store.create(spec, "hog", {}, owner="id:other-iss|hog")
    assert store.pending_of("id:iss|hog") == 3
    # deciding (any way) frees the owner's quota
    store.deny(mine[0].id, "alice", ("reviewers",))
    store.cancel(mine[1].id, "gone")
    assert store.pending_of("id:iss|hog") == 1
    store.create(spec, "hog", {}, owner="id:iss|hog")
    store.expire(mine[2].id)
    assert store.pending_of("id:iss|hog") == 1


def test_global_cap_still_applies_across_identities() -> None:
    store, clock, decided = make_store(max_pending=4, max_pending_per_identity=3)
    spec = ApprovalSpec("r", ("reviewers",))
    for who in ("a", "a", "b", "b"):
        store.create(spec, who, {}, owner=who)
    with pytest.raises(ApprovalError) as ei:
        store.create(spec, "c", {}, owner="c")
    assert ei.value.code == "approval_queue_full"


def test_owner_defaults_to_requester() -> None:
    store, clock, decided = make_store(max_pending_per_identity=1)
    spec = ApprovalSpec("r", ("reviewers",))
    store.create(spec, "x", {})
    with pytest.raises(ApprovalError):
        store.create(spec, "x", {})
    store.create(spec, None, {})
    with pytest.raises(ApprovalError):
        store.create(spec, None, {})


def test_max_pending_per_identity_parsed(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("approvals:\n  max_pending_per_identity: 5\n")
    assert load_rules(tmp_path).approvals.max_pending_per_identity == 5
    assert ApprovalsConfig().max_pending_per_identity == 20
    (tmp_path / "r.yaml").write_text("approvals:\n  max_pending_per_identity: 0\n")
    with pytest.raises(ConfigError):
        load_rules(tmp_path)


# ---------------------------------------------------------------- votes in the audit record
def _record_state(i: int, approval: dict) -> dict:
    t = time.time()
    return {"id": f"flow-{i}", "type": "http", "is_replay": None, "comment": "", "marked": "",
            "timestamp_created": t, "metadata": {"approval": approval}, "error": None,
            "client_conn": {"peername": ("127.0.0.1", 5000), "id": "c1"},
            "server_conn": {"address": ("127.0.0.1", 9443)},
            "request": {"host": "127.0.0.1", "port": 9443, "method": b"POST",
                        "scheme": b"https", "authority": b"", "path": b"/v1/chat/completions",
                        "http_version": b"HTTP/1.1", "headers": (), "content": b"{}",
                        "trailers": None, "timestamp_start": t, "timestamp_end": t},
            "response": None}


def test_every_vote_with_its_reason_reaches_the_audit_record(tmp_path) -> None:
    """The approver's reason was lost (only 'approved by X'); now each vote — who, via,
    when, why — is in the hashed flow record and in the approvals table, and an edit of
    a vote is caught by verify."""
    import duckdb

    from addons.recording import store as rec

    s = ApprovalStore()
    a = s.create(SPEC_2, "agent-1", {"method": "POST"})
    s.approve(a.id, "alice", ["reviewers"], reason="synthetic data only", via="slack")
    s.approve(a.id, "bob", ["reviewers"], reason="ok for the demo")
    meta = a.metadata()
    assert [(v["sub"], v["via"], v["reason"]) for v in meta["votes"]] == [
        ("alice", "slack", "synthetic data only"), ("bob", "api", "ok for the demo")]
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    rec.init_schema(con)
    rec.append(con, [rec.build_row(rec.Pending(_record_state(1, meta), "s"))], rec.head(con))
    assert rec.verify(con).ok
    (votes,) = con.execute("SELECT votes FROM approvals").fetchone()
    assert [v["reason"] for v in json.loads(votes)] == ["synthetic data only",
                                                          "ok for the demo"]
    (flow_approval,) = con.execute("SELECT approval FROM flows").fetchone()
    assert json.loads(flow_approval)["votes"][0]["via"] == "slack"
    con.execute("UPDATE approvals SET votes = '[]'")
    r = rec.verify(con)
    assert not r.ok and a.id in r.problem
    con.close()


def test_audit_db_from_before_votes_stays_readable(tmp_path) -> None:
    """An approvals table without the votes column (older gateways): verify passes when
    opened read-only, and a writer adds the column and goes on appending."""
    import duckdb

    from addons.recording import store as rec

    path = str(tmp_path / "old.duckdb")
    con = duckdb.connect(path)
    con.execute(rec.schema_sql(False).replace(", votes JSON", ""))
    con.execute("INSERT OR IGNORE INTO audit_meta VALUES ('schema_version', '1')")
    old = {"id": "ap-old", "state": "approved", "rule": "bulk", "approvers": ["bob"],
           "reason": "approved by bob"}
    row = rec.build_row(rec.Pending(_record_state(1, old), "s"))
    seq, h = rec.head(con)
    row.update(seq=seq + 1, prev_hash=h)
    row["hash"] = rec.chain_hash(h, row)
    con.execute(rec.INSERT_FLOWS, [[row.get(c)] for c in rec.COLUMN_NAMES])
    con.execute("INSERT INTO approvals VALUES ('ap-old', 'flow-1', NULL, 'bulk', NULL, NULL, "
                "'approved', ['bob'], 'approved by bob')")
    con.execute("INSERT OR REPLACE INTO audit_meta VALUES ('head', ?)", [f"{seq + 1}:"
                                                                           f"{row['hash']}"])
    con.close()
    ro = duckdb.connect(path, read_only=True)
    assert rec.verify(ro).ok
    ro.close()
    con = duckdb.connect(path)
    rec.init_schema(con)
    s = ApprovalStore()
    a = s.create(SPEC, "agent-1", {})
    s.deny(a.id, "alice", ["reviewers"], "no PII exports")
    rec.append(con, [rec.build_row(rec.Pending(_record_state(2, a.metadata()), "s"))],
               rec.head(con))
    assert rec.verify(con).ok
    assert con.execute("SELECT id, votes IS NULL FROM approvals ORDER BY id").fetchall() == [
        (a.id, False), ("ap-old", True)]
    con.close()

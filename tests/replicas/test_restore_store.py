"""The shared placeholder map (addons/masking/sessionstore.py) on a real postgresql, as two
replicas use it: two stores on one database agree on numbering and restore each other's
placeholders; values are sealed (AES-GCM) and indexed by HMAC, so neither a value nor a
session id is in the tables; per identity and session; another secret cannot open them;
rows expire with the session."""

from __future__ import annotations

import time

import psycopg
import pytest

from addons.masking.masker import session_key
from addons.masking.sessionstore import SecretMissing, SharedPlaceholders, gateway_secret
from tests.database.pgkit import ScramServer

SECRET = b"replica-shared-secret-0123456789"
EMAIL = "jane.roe.replicas@example.com"


@pytest.fixture(scope="module")
def dsn():
    s = ScramServer().start()
    yield s.admin_dsn("analytics")
    s.stop()


def test_two_replicas_share_numbering_and_restore(dsn) -> None:
    a, b = SharedPlaceholders(dsn, SECRET), SharedPlaceholders(dsn, SECRET)
    k = session_key("agent-1", "thread-x")
    ph = a.assign(k, "EMAIL_ADDRESS", "EMAIL", EMAIL.lower(), EMAIL, True)
    assert ph == "[EMAIL_1]"
    # the next request of the session lands on the other replica: same value, same number
    assert b.assign(k, "EMAIL_ADDRESS", "EMAIL", EMAIL.lower(), EMAIL, True) == "[EMAIL_1]"
    assert b.assign(k, "EMAIL_ADDRESS", "EMAIL", "bob@example.com", "bob@example.com",
                    True) == "[EMAIL_2]"
    # and the answer coming back through either replica is restored
    assert b.original(k, "[EMAIL_1]") == EMAIL
    assert a.original(k, "[EMAIL_2]") == "bob@example.com"
    # per identity and session: another agent naming the same session gets nothing
    assert a.original(session_key("agent-2", "thread-x"), "[EMAIL_1]") is None
    # a value the model produced (not restorable) keeps its placeholder
    ph3 = a.assign(k, "PHONE", "PHONE", "5550100", "555-0100", False)
    assert b.original(k, ph3) is None
    # stored sealed: no value, no session id, no subject in clear anywhere in the tables
    with psycopg.connect(dsn) as c:
        dump = repr(c.execute("SELECT * FROM agentgate_mask_values").fetchall()
                    + c.execute("SELECT * FROM agentgate_mask_counters").fetchall())
    for clear in (EMAIL, "bob@example.com", "thread-x", "agent-1"):
        assert clear not in dump and clear.encode().hex() not in dump
    # another secret opens nothing
    other = SharedPlaceholders(dsn, b"another-secret-0123456789abcdef")
    assert other.original(k, "[EMAIL_1]") is None
    for s in (a, b, other):
        s.close()


def test_concurrent_replicas_never_give_one_number_to_two_values(dsn) -> None:
    import threading
    k = session_key("agent-c", "race")
    stores = [SharedPlaceholders(dsn, SECRET) for _ in range(4)]
    got: dict[str, set[str]] = {}
    lock = threading.Lock()

    def run(s: SharedPlaceholders, base: int) -> None:
        for i in range(20):
            v = f"user{(base + i) % 30}@example.com"
            ph = s.assign(k, "EMAIL_ADDRESS", "EMAIL", v, v, True)
            with lock:
                got.setdefault(v, set()).add(ph)

    ts = [threading.Thread(target=run, args=(s, n * 7)) for n, s in enumerate(stores)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    assert all(len(p) == 1 for p in got.values()), got  # one number per value everywhere
    phs = [next(iter(p)) for p in got.values()]
    assert len(set(phs)) == len(phs)  # and one value per number
    for v, p in got.items():
        assert stores[0].original(k, next(iter(p))) == v
    for s in stores:
        s.close()


def test_rows_expire_with_the_session(dsn) -> None:
    s = SharedPlaceholders(dsn, SECRET, idle_ttl=0.5)
    k = session_key("agent-e", "short")
    ph = s.assign(k, "EMAIL_ADDRESS", "EMAIL", EMAIL, EMAIL, True)
    assert s.original(k, ph) == EMAIL
    time.sleep(1.0)
    assert s.original(k, ph) is None
    assert s.purge() >= 1
    s.close()


def test_secret_required_and_never_echoed(tmp_path) -> None:
    with pytest.raises(SecretMissing, match="AGENTGATE_SECRET"):
        gateway_secret({})
    with pytest.raises(SecretMissing) as e:
        gateway_secret({"AGENTGATE_SECRET": "short-secret"})
    assert "short-secret" not in str(e.value)
    f = tmp_path / "secret"
    f.write_text(SECRET.decode() + "\n")
    assert gateway_secret({"AGENTGATE_SECRET_FILE": str(f)}) == SECRET


def test_a_broken_link_fails_one_call_then_reconnects(dsn) -> None:
    """Postgres ended the store's connection (restart, failover, idle kill): the call that
    meets it raises — masking refuses that flow, never passes it — and the next reconnects."""
    s = SharedPlaceholders(dsn, SECRET)
    k = session_key("agent-r", "reconnect")
    ph = s.assign(k, "EMAIL_ADDRESS", "EMAIL", EMAIL, EMAIL, True)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> "
                  "pg_backend_pid() AND datname = current_database() AND "
                  "usename = current_user")
    with pytest.raises(psycopg.OperationalError):
        s.original(k, ph)
    assert s.original(k, ph) == EMAIL
    s.close()

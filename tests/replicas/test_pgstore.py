"""The shared approval store on a real Postgres (Debian's, started by the test): two stores
stand for two replicas; a hold opened on one is decided on the other, limits are global, a
replica that stops renewing its lease has its holds cancelled, and a database that goes away
refuses new holds (503) instead of approving them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from addons.approval.pgstore import PgApprovalStore, check_dsn
from addons.approval.store import (
    APPROVED,
    CANCELLED,
    DENIED,
    PENDING,
    ApprovalError,
    ApprovalSpec,
)
from tests.database.pgkit import ScramServer

SPEC = ApprovalSpec(rule="risky", groups=("reviewers",), timeout=60)


@pytest.fixture(scope="module")
def pg():
    server = ScramServer().start()
    yield server
    server.stop()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def started(dsn: str, **kw) -> PgApprovalStore:
    s = PgApprovalStore(dsn, **kw)
    await s.start()
    await until(lambda: s.ready, 15)
    return s


def test_decided_on_the_other_replica_both_ways(pg: ScramServer) -> None:
    async def main() -> None:
        # a 10 s poll: a decision seen within 2 s came by LISTEN/NOTIFY
        a = await started(pg.admin_dsn("postgres"), replica="a", poll=10)
        b = await started(pg.admin_dsn("postgres"), replica="b", poll=10)
        released: list[str] = []
        a.on_decided = lambda ap: released.append(ap.id)
        b.on_decided = lambda ap: released.append(ap.id)
        try:
            h = await a.acreate(SPEC, "agent-1", {"kind": "llm"}, "masked preview",
                                owner="id:agent-1")
            await until(lambda: b.get(h.id) is not None)  # the other replica sees it
            assert b.get(h.id).state == PENDING and b.get(h.id).preview == "masked preview"
            await b.aapprove(h.id, "rev-1", ["reviewers"])
            took = await until(lambda: h.id in released and a.get(h.id).state == APPROVED)
            assert took < 2.0, took  # LISTEN/NOTIFY, not the poll
            assert a.get(h.id).approvers == ["rev-1"]
            # and back: held on b, denied on a
            h2 = await b.acreate(SPEC, "agent-2", {"kind": "tool"}, "", owner="id:agent-2")
            await until(lambda: a.get(h2.id) is not None)
            await a.adeny(h2.id, "rev-2", ["reviewers"], "too risky")
            await until(lambda: b.get(h2.id).state == DENIED, 2.0)
            assert b.get(h2.id).reason == "too risky"
            # the in-memory store's checks run on the shared row: a second decision is 409,
            # self-approval 403, a reviewer outside the groups 403
            with pytest.raises(ApprovalError) as e:
                await a.aapprove(h.id, "rev-3", ["reviewers"])
            assert e.value.status == 409
            h3 = await a.acreate(SPEC, "agent-1", {}, "", owner="id:agent-1")
            with pytest.raises(ApprovalError) as e:
                await b.aapprove(h3.id, "agent-1", ["reviewers"])
            assert e.value.code == "self_approval"
            with pytest.raises(ApprovalError) as e:
                await b.aapprove(h3.id, "rev-9", ["others"])
            assert e.value.code == "reviewer_not_in_group"
            # a synchronous transition (the addon's timeout / cancellation) is replayed
            a.cancel(h3.id, "client left")
            await until(lambda: b.get(h3.id) is not None
                        and b.get(h3.id).state == CANCELLED, 3.0)
            # a synchronous vote (mitmweb's operator) on the holding replica is replayed
            op = SPEC.__class__(**{**SPEC.__dict__, "allow_mitmweb": True})
            h4 = await a.acreate(op, "agent-1", {}, "", owner="id:agent-1")
            await until(lambda: b.get(h4.id) is not None)
            a.approve(h4.id, "", via="mitmweb")
            await until(lambda: b.get(h4.id).state == APPROVED, 3.0)  # b has h4 (above)
            # one racing it on the other replica loses in Postgres, and its mirror is told
            h5 = await a.acreate(op, "agent-1", {}, "", owner="id:agent-1")
            await until(lambda: b.get(h5.id) is not None)
            for t in b._tasks:  # b hears nothing for a while (its LISTEN and poll stop)
                t.cancel()
            await a.adeny(h5.id, "rev-2", ["reviewers"], "first")
            b.approve(h5.id, "", via="mitmweb")  # b's mirror still says pending
            assert b.get(h5.id).state == APPROVED
            await b._replay_all()  # refused on the row: the deny came first
            assert b.get(h5.id).state == DENIED and b.get(h5.id).reason == "first"
            assert a.get(h5.id).state == DENIED
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


def test_limits_are_global(pg: ScramServer) -> None:
    async def main() -> None:
        a = await started(pg.admin_dsn("postgres"), replica="la")
        b = await started(pg.admin_dsn("postgres"), replica="lb")
        for s in (a, b):
            s.max_pending_per_identity = 2
            s.max_pending = 3
        try:
            base = await a._run(lambda c: _count(c), "count")
            a.max_pending = b.max_pending = base + 3
            await a.acreate(SPEC, "x", {}, owner="id:x")
            await b.acreate(SPEC, "x", {}, owner="id:x")
            with pytest.raises(ApprovalError) as e:  # the third of x, on either replica
                await a.acreate(SPEC, "x", {}, owner="id:x")
            assert e.value.code == "approval_quota_exceeded"
            await b.acreate(SPEC, "y", {}, owner="id:y")
            with pytest.raises(ApprovalError) as e:
                await a.acreate(SPEC, "z", {}, owner="id:z")
            assert e.value.code == "approval_queue_full"
            # concurrent creates from both replicas do not overshoot the global cap
            a.max_pending = b.max_pending = base + 13
            results = await asyncio.gather(
                *[s.acreate(SPEC, f"c{i}", {}, owner=f"id:c{i}")
                  for i in range(10) for s in (a, b)], return_exceptions=True)
            ok = [r for r in results if not isinstance(r, BaseException)]
            assert len(ok) == 10
            assert all(isinstance(r, ApprovalError) and r.status == 429
                       for r in results if isinstance(r, BaseException))
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


async def _count(c) -> int:
    cur = await c.execute("SELECT count(*) FROM agentgate_approvals WHERE state = 'pending'")
    return (await cur.fetchone())[0]


def test_a_dead_replicas_holds_are_cancelled(pg: ScramServer) -> None:
    async def main() -> None:
        survivor = await started(pg.admin_dsn("postgres"), replica="s", poll=0.2)
        dead = await started(pg.admin_dsn("postgres"), replica="d", lease=1.5, poll=0.2)
        try:
            h = await dead.acreate(SPEC, "agent", {}, owner="id:agent")
            other = await survivor.acreate(SPEC, "agent", {}, owner="id:agent")
            # the replica dies: no goodbye, its loops and connections just stop
            for t in dead._tasks:
                t.cancel()
            await dead._drop()
            await until(lambda: survivor.get(h.id) is not None
                        and survivor.get(h.id).state == CANCELLED, 10)
            assert "stopped" in survivor.get(h.id).reason
            assert survivor.get(other.id).state == PENDING  # the survivor's own hold stays
        finally:
            await survivor.aclose()

    asyncio.run(main())


def test_database_down_refuses_new_holds(pg: ScramServer) -> None:
    server = ScramServer().start()  # its own server: this test stops it

    async def main() -> None:
        s = await started(server.admin_dsn("postgres"), poll=0.2)
        try:
            server.proc.terminate()
            server.proc.wait(15)
            t0 = time.monotonic()
            with pytest.raises(ApprovalError) as e:
                await s.acreate(SPEC, "agent", {}, owner="id:agent")
            assert e.value.status == 503 and e.value.code == "approval_store_unavailable"
            assert time.monotonic() - t0 < 6
            assert len(s) == 0  # nothing was held
            await until(lambda: not s.ready, 10)
        finally:
            for t in s._tasks:
                t.cancel()
            await s._drop()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_bad_dsn_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError) as e:
        check_dsn("postgresql://u:s3cret@h/db?bogus_option=1")
    assert "s3cret" not in str(e.value)
    with pytest.raises(ValueError):
        check_dsn("not a dsn")


def test_a_restart_under_the_same_name_and_a_forgotten_deadline(pg: ScramServer) -> None:
    async def main() -> None:
        watcher = await started(pg.admin_dsn("postgres"), replica="w", poll=0.2)
        old = await started(pg.admin_dsn("postgres"), replica="same", poll=0.2)
        try:
            h = await old.acreate(SPEC, "agent", {}, owner="id:agent")
            for t in old._tasks:  # killed, and started again at once under the same name
                t.cancel()
            await old._drop()
            new = await started(pg.admin_dsn("postgres"), replica="same", poll=0.2)
            try:
                await until(lambda: watcher.get(h.id) is not None
                            and watcher.get(h.id).state == CANCELLED, 5)
                assert "restarted" in watcher.get(h.id).reason
                # a hold whose replica is alive but never expires it (a bug, a stuck
                # loop): any replica expires it LATE seconds past its deadline
                quick = ApprovalSpec(rule="r", groups=("g",), timeout=1)
                h2 = await new.acreate(quick, "agent", {}, owner="id:agent",
                                       now=time.time() - 40)
                await until(lambda: watcher.get(h2.id) is not None
                            and watcher.get(h2.id).state == "timeout", 5)
                await until(lambda: new.get(h2.id).state == "timeout", 5)
            finally:
                await new.aclose()
        finally:
            await watcher.aclose()

    asyncio.run(main())


def test_decided_holds_keep_a_short_preview_everywhere(pg: ScramServer) -> None:
    async def main() -> None:
        a = await started(pg.admin_dsn("postgres"), replica="pa")
        b = await started(pg.admin_dsn("postgres"), replica="pb")
        try:
            h = await a.acreate(SPEC, "agent", {}, "x" * 200_000, owner="id:agent")
            await until(lambda: b.get(h.id) is not None)
            assert len(b.get(h.id).preview) == 200_000  # pending: reviewers see it whole
            await b.adeny(h.id, "rev", ["reviewers"], "no")

            async def stored(c) -> int:
                cur = await c.execute("SELECT length(record->>'preview') FROM "
                                      "agentgate_approvals WHERE id = %s", (h.id,))
                return (await cur.fetchone())[0]

            assert await a._run(stored, "test") == 16 * 1024
            await until(lambda: a.get(h.id).state == DENIED)
            assert b.get(h.id).preview_truncated
            assert len(b.get(h.id).preview) == 16 * 1024
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())

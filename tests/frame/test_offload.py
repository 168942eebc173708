"""frame/offload.FairPool: per-identity bounded, round-robin share of worker threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from addons.frame.offload import Busy, FairPool, flow_key


class Jobs:
    """Worker-thread jobs that run until released; records the order they started in."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def job(self, name: str) -> str:
        with self.lock:
            self.started.append(name)
            gate = self.gates.setdefault(name, threading.Event())
        assert gate.wait(10), f"{name} never released"
        return name

    def release(self, name: str) -> None:
        with self.lock:
            self.gates.setdefault(name, threading.Event()).set()


async def _settle(pool: FairPool, jobs: Jobs, n: int) -> None:
    """Until `n` jobs have started in their threads (and the loop ran what it could)."""
    for _ in range(400):
        await asyncio.sleep(0.005)
        if len(jobs.started) >= n:
            await asyncio.sleep(0.02)
            return
    raise AssertionError(f"only {jobs.started} started")


def test_one_identity_never_takes_every_slot() -> None:
    async def main() -> None:
        pool, jobs = FairPool(total=2, per_key=1), Jobs()
        flood = [asyncio.create_task(pool.run("A", jobs.job, f"a{i}")) for i in range(4)]
        await _settle(pool, jobs, 1)
        assert jobs.started == ["a0"] and pool.running == 1  # A's bound, the second slot free
        other = asyncio.create_task(pool.run("B", jobs.job, "b0"))
        await _settle(pool, jobs, 2)
        assert jobs.started == ["a0", "b0"]  # B does not wait behind A's backlog
        jobs.release("b0")
        assert await other == "b0"
        for i in range(4):
            jobs.release(f"a{i}")
        assert await asyncio.gather(*flood) == ["a0", "a1", "a2", "a3"]
        assert pool.running == 0 and pool.queued == 0

    asyncio.run(main())


def test_freed_slot_goes_round_robin_not_first_come() -> None:
    async def main() -> None:
        pool, jobs = FairPool(total=1, per_key=1), Jobs()
        tasks = [asyncio.create_task(pool.run("A", jobs.job, f"a{i}")) for i in range(3)]
        await _settle(pool, jobs, 1)
        tasks.append(asyncio.create_task(pool.run("B", jobs.job, "b0")))
        tasks.append(asyncio.create_task(pool.run("C", jobs.job, "c0")))
        await asyncio.sleep(0.05)
        for name in ["a0", "b0", "c0", "a1", "a2"]:
            await _settle(pool, jobs, len(jobs.started))
            jobs.release(name)
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        # queued first were a1, a2 (before B and C), yet B and C each came next
        assert jobs.started == ["a0", "b0", "c0", "a1", "a2"]

    asyncio.run(main())


def test_full_queues_refuse_at_once() -> None:
    async def main() -> None:
        pool, jobs = FairPool(total=1, per_key=1, queue_per_key=2, queue_total=3), Jobs()
        a = [asyncio.create_task(pool.run("A", jobs.job, f"a{i}")) for i in range(3)]
        await _settle(pool, jobs, 1)
        with pytest.raises(Busy) as e:
            await pool.run("A", jobs.job, "a3")
        assert e.value.status == 429 and "this identity" in e.value.message
        b = asyncio.create_task(pool.run("B", jobs.job, "b0"))
        await asyncio.sleep(0.02)
        with pytest.raises(Busy) as e:
            await pool.run("C", jobs.job, "c0")
        assert e.value.status == 503 and "queue is full" in e.value.message
        assert pool.refused == 2
        for name in ["a0", "b0", "a1", "a2"]:
            jobs.release(name)
        await asyncio.gather(*a, b)
        assert "a3" not in jobs.started and "c0" not in jobs.started
        assert pool.running == 0 and pool.queued == 0

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_queue_and_running_job_keeps_its_slot() -> None:
    async def main() -> None:
        pool, jobs = FairPool(total=1, per_key=1), Jobs()
        first = asyncio.create_task(pool.run("A", jobs.job, "a0"))
        await _settle(pool, jobs, 1)
        waiting = asyncio.create_task(pool.run("B", jobs.job, "b0"))
        await asyncio.sleep(0.02)
        assert pool.queued == 1
        waiting.cancel()
        await asyncio.sleep(0.02)
        assert pool.queued == 0
        first.cancel()  # its thread cannot be stopped: the slot stays taken until it ends
        await asyncio.sleep(0.02)
        late = asyncio.create_task(pool.run("C", jobs.job, "c0"))
        await asyncio.sleep(0.05)
        assert jobs.started == ["a0"] and pool.running == 1
        jobs.release("a0")
        jobs.release("c0")
        assert await late == "c0"
        assert "b0" not in jobs.started
        assert pool.running == 0 and pool.queued == 0

    asyncio.run(main())


def test_an_exception_in_the_job_is_raised_and_frees_the_slot() -> None:
    def boom() -> None:
        raise ValueError("x")

    async def main() -> None:
        pool = FairPool(total=1, per_key=1)
        with pytest.raises(ValueError):
            await pool.run("A", boom)
        assert pool.running == 0
        assert await pool.run("A", lambda: 7) == 7

    asyncio.run(main())


def test_identity_key_is_issuer_and_subject() -> None:
    class F:
        def __init__(self, ident: object) -> None:
            self.metadata = {"identity": ident}

    a = flow_key(F({"iss": "https://a", "sub": "alice"}))
    b = flow_key(F({"iss": "https://b", "sub": "alice"}))
    assert a != b and flow_key(F(None)) == "-"

"""Heavy body work handed to worker threads, shared fairly between identities. Pure: no
mitmproxy import; imports only frame/principal.

Masking a findings-dense body (and policy's work on a large or compressed one) runs in a
worker thread so that the event loop keeps serving. Threads alone do not isolate agents:
masking is GIL-bound, every heavy job competes with the loop for the one interpreter, and
`asyncio.to_thread`'s executor takes whatever it is given (min(32, cores + 4) threads). Two
agents flooding e-mail-dense bodies moved a third agent's 1 KB p50 from 6 to ~40 ms
(BENCHMARKS, PERF-AC): each flooding job is one more thread the loop waits behind.

FairPool bounds that work:
- at most `total` heavy jobs run at once (in threads; TOTAL below), at most `per_key` of
  them for one identity (frame/principal: issuer AND subject), so one identity's flood never takes
  every slot;
- jobs waiting for a slot queue per identity, and a freed slot goes to the next identity
  in round-robin order (not to whoever queued first), so an identity with one job waits
  behind at most one job of each other identity, never behind another's backlog;
- queues are bounded (`queue_per_key` per identity, `queue_total` in all): a job over the
  bound is refused at once with Busy, which the caller answers as an error in the
  caller's dialect (429 for the identity's own queue, 503 when the gateway's is full).
The event loop never waits on the pool: callers `await` (a Future per queued job), and a
job cancelled while queued (its client went away) leaves the queue; one cancelled while
running keeps its slot until its thread returns (the thread cannot be stopped).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from addons.frame.principal import principal

log = logging.getLogger("agentgate.offload")

# How many heavy jobs run at once: one core's worth of threads besides the loop's, at most
# 4. Each running job is one more thread the event loop waits behind for the GIL (~5 ms
# per switch): measured on 2 cores (bench/bench_fairness.py, one run, BENCHMARKS PERF-AE),
# a light agent's 1 KB p50 while two identities flood e-mail-dense bodies was 59-70 ms
# with asyncio.to_thread's executor (up to 6 threads), 35-53 with 4 slots (2 per
# identity), 26-31 with 2 (1 per identity), 13-19 with 1 — and the flood's throughput was
# the same (GIL-bound); 100 KB c=16 from one identity unchanged within noise.
TOTAL = max(1, min(4, (os.cpu_count() or 2) - 1))
PER_KEY = max(1, TOTAL // 2)
# Waiting jobs: one identity may have this many queued (a busy agent with many parallel
# workers behind one token), the gateway this many in all; beyond, Busy at once.
QUEUE_PER_KEY = 128
QUEUE_TOTAL = 1024


class Busy(Exception):
    """The job was not queued: `status` 429 (this identity's queue is full) or 503 (the
    gateway's). The message names the bound and no value of the body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FairPool:
    """Per-identity bounded, round-robin share of worker-thread slots (see module doc)."""

    def __init__(self, total: int = TOTAL, per_key: int = PER_KEY,
                 queue_per_key: int = QUEUE_PER_KEY, queue_total: int = QUEUE_TOTAL) -> None:
        if min(total, per_key, queue_per_key, queue_total) < 1:
            raise ValueError("FairPool bounds must be at least 1")
        self.total = total
        self.per_key = min(per_key, total)
        self.queue_per_key = queue_per_key
        self.queue_total = queue_total
        self.running = 0
        self._running: dict[str, int] = {}
        # identity -> its waiting jobs; the dict's order is the round-robin order (an
        # identity served moves to the end)
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self.queued = 0
        self.refused = 0  # jobs answered with Busy since start (a counter for tests/bench)

    def _can_start(self, key: str) -> bool:
        return self.running < self.total and self._running.get(key, 0) < self.per_key

    def _start(self, key: str) -> None:
        self.running += 1
        self._running[key] = self._running.get(key, 0) + 1

    def _release(self, key: str) -> None:
        self.running -= 1
        n = self._running[key] - 1
        if n:
            self._running[key] = n
        else:
            del self._running[key]
        if key in self._waiting:  # it was just served: the others' turn first
            self._waiting.move_to_end(key)
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to waiting jobs, one identity after another in round-robin
        order. A slot is counted as taken when granted (before the waiter resumes), so
        nothing can overtake it."""
        while self.running < self.total and self._waiting:
            for key in list(self._waiting):
                if self._running.get(key, 0) >= self.per_key:
                    continue
                q = self._waiting[key]
                fut = q.popleft()
                self.queued -= 1
                if q:
                    self._waiting.move_to_end(key)
                else:
                    del self._waiting[key]
                if fut.done():  # cancelled while queued, its task not resumed yet
                    break
                self._start(key)
                fut.set_result(None)
                break
            else:
                return  # every waiting identity is at its own bound

    async def _acquire(self, key: str) -> None:
        if not self._waiting and self._can_start(key):
            self._start(key)
            return
        q = self._waiting.get(key)
        if q is not None and len(q) >= self.queue_per_key:
            self.refused += 1
            log.warning("agentgate: heavy body work refused: an identity's queue is full")
            raise Busy(429, f"too much heavy body work queued for this identity (more than "
                            f"{self.queue_per_key} requests waiting); retry later")
        if self.queued >= self.queue_total:
            self.refused += 1
            log.warning("agentgate: heavy body work refused: the gateway's queue is full")
            raise Busy(503, f"the gateway's heavy body work queue is full ({self.queue_total} "
                            f"requests waiting); retry later")
        if q is None:
            q = self._waiting[key] = deque()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q.append(fut)
        self.queued += 1
        self._grant()  # this identity may be under its bound while others wait at theirs
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(key)  # granted, then cancelled before it ran: give it back
            elif fut in q:
                q.remove(fut)
                self.queued -= 1
                if not q and self._waiting.get(key) is q:
                    del self._waiting[key]
            raise

    async def run[R](self, key: str, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """`fn(*args, **kwargs)` in a worker thread once this identity's turn comes.
        Raises Busy (not queued) or what `fn` raises."""
        await self._acquire(key)
        try:
            job = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        except BaseException:
            self._release(key)
            raise
        # the slot is freed when the thread returns, not when the caller stops waiting (a
        # cancelled flow's thread keeps running: it still counts)
        job.add_done_callback(lambda j: (self._release(key),
                                         j.cancelled() or j.exception()))
        return await asyncio.shield(job)


POOL = FairPool()


class StreamJob:
    """The heavy part of one call of a streamed response's stream function (masking's SSE
    chunks, an MCP server's events): `work()` runs in a worker thread (masking/streamwork.py
    pauses the stream's layer meanwhile) and stores what it returned or raised; `done`
    tells the stream function it may hand it back."""

    def __init__(self, flow: Any, work: Callable[[], Any]) -> None:
        self.flow = flow
        self.work = work
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as e:  # noqa: BLE001 - handed back to the layer's call
            self.error = e
        self.done = True


def take_ready(owner: Any, data: bytes) -> StreamJob | None:
    """The job `owner` prepared for this very chunk (`owner._ready`, set when the layer asked
    whether it is heavy), finished: run here, on the loop, when no worker thread ran it (small
    work, or no handler ran the hook). None when the layer called without asking first."""
    ready = owner._ready  # noqa: SLF001 - the stream function's own slot
    if ready is None or ready[0] is not data:
        return None
    owner._ready = None  # noqa: SLF001
    job = ready[1]
    if not job.done:
        job.run()
    return job


def flow_key(flow: Any) -> str:
    """The identity a flow's heavy work is counted against (issuer and subject)."""
    return principal(flow.metadata.get("identity"))


# Streams whose dialect can say "too busy" in-band: each callable gets the flow of a stream
# job the pool refused and returns what to emit instead of that chunk (the stream then
# emits nothing more of its own), or None. The mcp addon registers one: a JSON-RPC error
# event for each pending request, where an aborted stream left the client hanging.
BUSY_ANSWERS: list[Callable[[Any], Any]] = []


async def run_heavy[R](flow: Any, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """`fn(*args, **kwargs)` in a worker thread, in the flow's identity's share of POOL.
    Raises Busy, unless `fn` is a StreamJob's run and a BUSY_ANSWERS entry answers for its
    flow: then that answer is the job's result (nothing of the chunk was judged or passed)."""
    try:
        return await POOL.run(flow_key(flow), fn, *args, **kwargs)
    except Busy:
        job = getattr(fn, "__self__", None)
        if isinstance(job, StreamJob) and not job.done:
            for answer in BUSY_ANSWERS:
                out = answer(job.flow)
                if out is not None:
                    job.result, job.error, job.done = out, None, True
                    return None  # type: ignore[return-value] - StreamJob.run returns None
        raise

"""A result row whose masking is heavy work does not hold the gateway's event loop: a
DataRow of e-mail addresses (one row, a few MB) is masked in a worker thread while another
agent's small queries keep being answered; the row still arrives masked and in order.

Real postgres, the real gateway (mitmdump with the suite), psycopg 3 clients."""

from __future__ import annotations

import threading
import time

from tests.database import test_relay_e2e as relay
from tests.database.test_relay_e2e import Env

# the relay tests' fixtures: real postgres (scram) and the gateway in front of it
pgserver = relay.pgserver
env = relay.env

N_ADDRESSES = 200_000
BIG = ("SELECT string_agg('someone' || g || '@example.com', ' ') "
       f"FROM generate_series(1, {N_ADDRESSES}) g")


def test_heavy_row_masked_off_the_loop(env: Env) -> None:
    with env.connect() as small, env.connect() as big:
        assert small.execute("SELECT 1").fetchone() == (1,)
        stalls: list[float] = []
        done = threading.Event()
        result: list[str] = []

        def run_big() -> None:
            try:
                result.append(big.execute(BIG).fetchone()[0])
            finally:
                done.set()

        t = threading.Thread(target=run_big)
        started = time.monotonic()
        t.start()
        while not done.is_set():
            t0 = time.monotonic()
            assert small.execute("SELECT 1").fetchone() == (1,)
            stalls.append(time.monotonic() - t0)
        t.join(60)
        took = time.monotonic() - started
    text = result[0]
    print(f"big row {took:.2f} s; {len(stalls)} small queries, longest {max(stalls):.3f} s")
    assert "@example.com" not in text, "an address of the row reached the agent"
    assert "EMAIL" in text
    # The big row took `took` seconds (its masking most of it); on the loop, one small
    # query would have waited for all of it. In a thread, small queries go on.
    assert took > 0.5, f"the row was masked too fast ({took:.2f} s) to tell anything"
    assert len(stalls) >= 3, f"only {len(stalls)} small queries answered in {took:.2f} s"
    assert max(stalls) < took * 0.5, (
        f"a small query waited {max(stalls):.2f} s of the big row's {took:.2f} s")

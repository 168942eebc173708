"""Hostile: the audit writer's plain INSERT of new blobs (store.BlobCache: blobs the cache
knows to be stored are not sent; the others go in with a plain INSERT, and a blob stored
all the same fails the batch, written again with INSERT OR IGNORE). A gateway restarted
on the same store starts with an empty cache while the store holds every blob of the
conversation so far: the next turns re-send that history. Through two real mitmdumps one
after the other on one data directory, with the writer process: every turn is recorded
(none lost to the conflict), `agentgate audit verify` walks one chain across the restart,
and `agentgate export` gives back exactly the bodies the upstream received, before and
after the restart."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import standin_upstreams_yaml, start_gateway
from tests.hostile.test_fastpaths3_audit import verified_export

pytestmark = pytest.mark.integration

OPENAI = "https://api.openai.com/v1/chat/completions"
FILLER = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 120  # ~7 KB


def _turns(gw, standin, history: list[dict], first: int, last: int) -> list[str]:
    sent = []
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for t in range(first, last):
            history.append({"role": "user",
                            "content": f"turn {t}: {FILLER} mail ann{t}@example.com"})
            standin.clear()
            r = c.post(OPENAI, headers={"x-agent-session": "restart",
                                        "authorization": "Bearer sk-agent"},
                       json={"model": "gpt-4o-mini", "messages": history})
            assert r.status_code == 200, r.text[:300]
            assert len(standin.requests) == 1
            sent.append(standin.requests[0]["body"])
            history.append({"role": "assistant", "content": f"noted {t}"})
    return sent


def test_a_restart_on_the_same_store_records_the_resent_history(
        tmp_path, gateway_confdir, standin, no_identity) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(standin_upstreams_yaml(standin) + no_identity
                                      + "recorder:\n  batch_interval_ms: 20\n")
    data = tmp_path / "data"
    data.mkdir()
    history: list[dict] = []
    sent: list[str] = []
    for run in range(2):
        gw = start_gateway(rules, gateway_confdir, data, tmp_path / f"gateway{run}.log",
                           standin_ca=standin.ca_path)
        try:
            sent += _turns(gw, standin, history, 4 * run, 4 * run + 4)
        finally:
            assert gw.stop() == 0
        log = (tmp_path / f"gateway{run}.log").read_text()
        assert "Traceback" not in log, log[-3000:]
    assert all("ann1@example.com" not in s for s in sent)
    got = [f.request.content.decode()
           for f in verified_export(data / "agentgate.duckdb", "restart", tmp_path)]
    assert len(got) == 8
    assert got == sent
    # the second run's turns re-sent the first run's history, masked the same way
    first = json.loads(sent[3])["messages"]
    assert json.loads(sent[4])["messages"][:len(first)] == first

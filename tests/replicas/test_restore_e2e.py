"""Reversible masking across replicas, through two real gateways (mitmdump) sharing one real
postgresql (AGENTGATE_STATE) and one secret (AGENTGATE_SECRET): a session whose calls land
on either replica keeps one placeholder numbering and gets its originals back from both;
nothing of the values is in clear in Postgres; another identity's session gets nothing.
Without the shared store (memory, as before) the second replica cannot restore: the same
test with AGENTGATE_STATE unset is the control."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.database.pgkit import ScramServer
from tests.recording.test_restore_record_e2e import oa, rules

pytestmark = pytest.mark.integration

EMAIL = "ingrid.replica@example.com"
OTHER = "olaf.replica@example.com"
SECRET = "replicas-share-this-secret-0123456789"


@pytest.fixture
def pg():
    s = ScramServer().start()
    yield s
    s.stop()


def two_gateways(gateway_factory, standin, env: dict[str, str]):
    return [gateway_factory(rules(standin), env=env) for _ in range(2)]


def say(gw, session: str, text: str) -> str:
    r = oa(gw, session).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
    return r.choices[0].message.content


def sent(standin) -> list[str]:
    return [json.loads(r["body"])["messages"][0]["content"] for r in standin.requests]


def test_restore_across_replicas(pg, gateway_factory, standin) -> None:
    env = {"AGENTGATE_STATE": pg.admin_dsn("analytics"), "AGENTGATE_SECRET": SECRET}
    a, b = two_gateways(gateway_factory, standin, env)
    standin.clear()
    # turn 1 on replica a: the address is masked upstream and restored for the agent
    assert say(a, "conv-1", f"mail {EMAIL}") == f"echo: mail {EMAIL}"
    # turn 2 on replica b: the model's answer names [EMAIL_1], numbered on replica a
    assert say(b, "conv-1", "[EMAIL_1] again") == f"echo: {EMAIL} again"
    # turn 3 on replica b: the same address keeps its number, a new one gets the next
    assert say(b, "conv-1", f"{EMAIL} and {OTHER}") == f"echo: {EMAIL} and {OTHER}"
    # turn 4 back on replica a: b's new number is restored there too
    assert say(a, "conv-1", "[EMAIL_2] please") == f"echo: {OTHER} please"
    assert sent(standin) == ["mail [EMAIL_1]", "[EMAIL_1] again",
                             "[EMAIL_1] and [EMAIL_2]", "[EMAIL_2] please"]
    # another session (identity is not required here: same subject) gets nothing back
    assert say(b, "conv-2", "[EMAIL_1]") == "echo: [EMAIL_1]"
    with psycopg.connect(pg.admin_dsn("analytics")) as c:
        dump = repr(c.execute("SELECT * FROM agentgate_mask_values").fetchall())
    assert dump.count("[EMAIL_") == 2
    for clear in (EMAIL, OTHER, "conv-1"):
        assert clear not in dump and clear.encode().hex() not in dump
    for gw in (a, b):
        assert SECRET not in gw.logs() and EMAIL not in gw.logs()


def test_without_shared_state_the_other_replica_cannot_restore(gateway_factory,
                                                                standin) -> None:
    """The control: memory only (as before issue 17), replica b does not know [EMAIL_1]."""
    a, b = two_gateways(gateway_factory, standin, {})
    assert say(a, "conv-m", f"mail {EMAIL}") == f"echo: mail {EMAIL}"
    assert say(b, "conv-m", "[EMAIL_1] again") == "echo: [EMAIL_1] again"


def test_missing_secret_keeps_placeholders_in_memory(pg, gateway_factory, standin) -> None:
    """AGENTGATE_STATE without AGENTGATE_SECRET: nothing is stored unencrypted — values stay
    in the replica's memory (masked and restored there, as before), with a warning naming
    the variable to set."""
    a, b = two_gateways(gateway_factory, standin, {"AGENTGATE_STATE": pg.admin_dsn("analytics")})
    standin.clear()
    assert say(a, "conv-s", f"mail {EMAIL}") == f"echo: mail {EMAIL}"
    assert say(b, "conv-s", "[EMAIL_1] again") == "echo: [EMAIL_1] again"
    assert sent(standin) == ["mail [EMAIL_1]", "[EMAIL_1] again"]
    assert "AGENTGATE_SECRET" in a.logs()
    with psycopg.connect(pg.admin_dsn("analytics")) as c:
        assert c.execute("SELECT to_regclass('agentgate_mask_values')").fetchone()[0] is None


def test_state_from_the_rules(pg, gateway_factory, standin) -> None:
    """`state:` in the rules (no AGENTGATE_STATE) shares the placeholders the same way."""
    from tests.database.pgkit import ADMIN_PASSWORD
    url = f"postgresql://admin:{ADMIN_PASSWORD}@127.0.0.1:{pg.port}/analytics"
    a, b = [gateway_factory({"rules.yaml": rules(standin), "state.yaml": f"state: {url}\n"},
                            env={"AGENTGATE_SECRET": SECRET}) for _ in range(2)]
    standin.clear()
    assert say(a, "conv-r", f"mail {EMAIL}") == f"echo: mail {EMAIL}"
    assert say(b, "conv-r", "[EMAIL_1] again") == f"echo: {EMAIL} again"
    for gw in (a, b):
        assert ADMIN_PASSWORD not in gw.logs()

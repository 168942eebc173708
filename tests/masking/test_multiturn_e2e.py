"""A growing conversation through a real mitmdump: what the upstream receives each turn is
byte for byte what masking the whole body again gives (the gateway takes the re-sent
history from the session's previous turn: decode.parse_memo + bodies.CachedPrefix), and an
agent that edits an earlier message never gets the stale masked form of it forwarded.

The reference is the masking engine in this process, with no cache and its own parse,
fed the same bodies in the same order (same detectors, a fresh placeholder session)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import httpx
import pytest

from addons.masking.bodies import Masked
from addons.masking.config import MaskingConfig
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session
from tests.conftest import Gateway, standin_upstreams_yaml, start_gateway

pytestmark = pytest.mark.integration

WORDS = ("the customer asked whether the order could ship before friday and if the "
         "invoice address is still correct; please check the ticket history").split()


def _prose(rng: random.Random, n: int, tag: str) -> str:
    out = [rng.choice(WORDS) for _ in range(n)]
    out.insert(n // 3, f"{tag}.{rng.randrange(10**6)}@example.com")
    out.insert(2 * n // 3, f"+1 415 555 {rng.randrange(1000, 9999)}")
    return " ".join(out)


@pytest.fixture(scope="module")
def gw(standin, gateway_confdir, tmp_path_factory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("multiturn-e2e")
    rules = tmp / "rules"
    rules.mkdir()
    # a policy rule that reads the body (as the bench's): policy parses it with the
    # session's memo key; masking reads that same parse
    (rules / "rules.yaml").write_text(
        standin_upstreams_yaml(standin) + "identity:\n  required: false\n"
        "policies:\n  - name: no-big-models\n    match: {model: ['gpt-5*']}\n"
        "    action: block\n")
    g = start_gateway(rules, gateway_confdir, tmp / "data", tmp / "gateway.log",
                      standin_ca=standin.ca_path)
    yield g
    g.stop()


def _forwarded_as_masking_again(c: httpx.Client, standin, body: bytes, session: str,
                                ref: Masked, turn: int) -> str:
    """Send one turn; what the upstream got is what `ref` (the reference session) masks
    the whole body to. Returns it."""
    standin.clear()
    r = c.post("https://api.openai.com/v1/chat/completions", content=body,
               headers={"content-type": "application/json", "x-agent-session": session})
    assert r.status_code == 200, r.text[:300]
    got = standin.requests[-1]["body"]
    want = ref.body(body, "application/json")
    assert want is not None
    assert got == want.decode(), f"turn {turn}: forwarded body differs"
    return got


def test_every_turn_is_what_masking_the_whole_body_gives(gw: Gateway, standin) -> None:
    rng = random.Random(16)
    ref_masker = Masker(DetectorSet(MaskingConfig()), b"k")
    ref_session = Session()
    msgs: list[dict] = [{"role": "system", "content": "You are a careful support agent."}]
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for turn in range(14):
            if turn:
                msgs.append({"role": "assistant", "content": _prose(rng, 250, f"a{turn}")})
            msgs.append({"role": "user", "content": _prose(rng, 120, f"u{turn}")})
            if turn == 9:
                # the agent edits history: an earlier message's address changes (same
                # length, same position); its old masked form must not be forwarded
                old = msgs[3]["content"]
                at = old.index("@example.com")
                msgs[3] = {**msgs[3], "content": old[:at - 1] + "7" + old[at:]}
            body = json.dumps({"model": "gpt-4o-mini", "messages": msgs}).encode()
            got = _forwarded_as_masking_again(
                c, standin, body, "multiturn-1",
                Masked(ref_masker, ref_session, {}, dialect="openai"), turn)
            assert "@example.com" not in got
    assert len(body) > 3 * 8192  # the history long enough to be remembered (MEMO_MIN_CHARS)


def test_two_identities_same_session_id_do_not_share(gw: Gateway, standin) -> None:
    """Two clients with the same X-Agent-Session but different connections and no
    identity are the same session to the gateway ('-' subject): here, the same history
    sent by a second agent under another session id is masked from scratch, with its own
    numbering, exactly as the reference gives for a fresh session."""
    rng = random.Random(7)
    msgs = [{"role": "user", "content": _prose(rng, 400, f"x{i}")} for i in range(6)]
    body = json.dumps({"model": "gpt-4o-mini", "messages": msgs}).encode()
    url = "https://api.openai.com/v1/chat/completions"
    outs = []
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for sid in ("alpha", "beta"):
            standin.clear()
            r = c.post(url, content=body, headers={"content-type": "application/json",
                                                   "x-agent-session": sid})
            assert r.status_code == 200
            outs.append(standin.requests[-1]["body"])
    want = Masked(Masker(DetectorSet(MaskingConfig()), b"k"), Session(), {},
                  dialect="openai").body(body, "application/json")
    assert want is not None
    assert outs == [want.decode(), want.decode()]


def test_tools_settings_and_respelled_values_around_the_history(gw: Gateway,
                                                                 standin) -> None:
    """The parts around the history (tools, settings) repeat clean most turns and carry an
    address in some (same keys, same shape), and the agent writes a value of the history
    again in another spelling (the session's map changes under the taken history): every
    turn forwards what masking the whole body again gives, the address never in clear."""
    rng = random.Random(23)
    ref_masker = Masker(DetectorSet(MaskingConfig()), b"k")
    ref_session = Session()
    tool = {"type": "function", "function": {
        "name": "lookup_customer", "description": "Find a customer by name.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    leaky = {**tool, "function": {**tool["function"],
                                  "description": "Escalate to Dana.Ross@example.com."}}
    msgs: list[dict] = [{"role": "system", "content": "You are a careful support agent."},
                        {"role": "user", "content": _prose(rng, 200, "first")
                         + " and write to Ann.Lee@example.com"}]
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30) as c:
        for turn in range(9):
            if turn:
                msgs.append({"role": "assistant", "content": _prose(rng, 250, f"a{turn}")})
                extra = " (again: ANN.LEE@example.com)" if turn in (4, 7) else ""
                msgs.append({"role": "user", "content": _prose(rng, 120, f"u{turn}") + extra})
            body = json.dumps({"model": "gpt-4o-mini", "messages": msgs,
                               "tools": [leaky if turn in (3, 6) else tool],
                               "temperature": 0.2}).encode()
            got = _forwarded_as_masking_again(
                c, standin, body, "multiturn-parts",
                Masked(ref_masker, ref_session, {}, dialect="openai"), turn)
            assert "Dana.Ross" not in got and "Ann.Lee" not in got and "ANN.LEE" not in got

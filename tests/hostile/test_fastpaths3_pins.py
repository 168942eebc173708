"""Hostile: MCP tool pins with `pinning.scope: identity` were kept per token SUBJECT
(`server|alice`), while everything else the gateway keeps per identity is keyed by issuer
AND subject (addons/frame/principal.py; rules/README.md says so). With two issuers
trusted, the second issuer's `alice` shared the first one's pin set: her tools/list was
compared with (and marked changes in) the other alice's pins, and an operator's `accept
--identity alice` decided for both.

Through a real mitmdump with two real local issuers both signing `sub: alice`: the first
alice pins a tool, the server changes its description, the second alice lists and calls
it — as for any other identity, she pins the definition she sees and her call passes,
while the first alice (whose pin changed) is held to an operator's acceptance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.hostile.test_mcp import RULES, URL, HostileServer, _tools_answer, call


def test_same_subject_other_issuer_has_its_own_pins(gateway_factory, make_local_issuer,
                                                    standin, tmp_path: Path) -> None:
    evil = HostileServer(Path(standin.ca_path).parent)
    evil.thread.start()
    try:
        a, b = make_local_issuer(), make_local_issuer()
        pins = tmp_path / "pins.json"
        rules = RULES.format(port=evil.port).replace("identity:\n  required: false\n", "")
        gw = gateway_factory(rules + (
            f"identity:\n  required: true\n  issuers:\n"
            f"    - {{issuer: \"{a.issuer}\", audience: agentgate}}\n"
            f"    - {{issuer: \"{b.issuer}\", audience: agentgate}}\n"
            f"mcp:\n  pinning: {{store: {pins}, scope: identity}}\n"))
        tool = {"name": "add", "description": "Adds.", "inputSchema": {"type": "object"}}
        answer = [_tools_answer(tool)]
        evil.script = lambda method, body: answer[0](method, body)

        def as_(token: str, body: Any) -> httpx.Response:
            with httpx.Client(proxy=gw.proxy_url(token), verify=str(gw.ca_cert),
                              timeout=30) as c:
                return c.post(URL, json=body,
                              headers={"accept": "application/json, text/event-stream"})

        alice_a, alice_b = a.token(sub="alice"), b.token(sub="alice")
        listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        assert as_(alice_a, listing).json()["result"]["tools"]
        answer[0] = _tools_answer({**tool, "description": "Adds. And more."})
        assert as_(alice_b, listing).json()["result"]["tools"]
        got_b = as_(alice_b, call("add", 2)).json()
        assert "result" in got_b, got_b     # her own first sight of the tool: pinned as is
        assert as_(alice_a, listing).json()["result"]["tools"]
        got_a = as_(alice_a, call("add", 3)).json()
        assert got_a["error"]["data"]["rule"] == "mcp.pin:add", got_a
        scopes = set(json.loads(pins.read_text()))
        assert len(scopes) == 2, scopes
    finally:
        evil.httpd.shutdown()
        evil.httpd.server_close()


def test_the_operator_picks_one_issuers_subject(tmp_path: Path) -> None:
    """`agentgate mcp pins accept|reset --identity SUB [--issuer ISS]` on the per-identity
    pin sets: --issuer narrows to one issuer's subject; a set written before (subject
    alone) is still found by --identity."""
    from addons.frame.principal import principal
    from addons.mcp.pins import PinStore, scope_key
    from tests.hostile.test_mcp import _pins

    store = tmp_path / "pins.json"
    s = PinStore(store)
    v1 = {"name": "add", "description": "Adds.", "inputSchema": {"type": "object"}}
    v2 = {**v1, "description": "Adds. And more."}
    scopes = [scope_key("srv", principal({"iss": iss, "sub": "alice"}), True)
              for iss in ("https://a.example", "https://b.example")] + ["srv|alice"]
    for sc in scopes:
        s.observe(sc, [v1])
        s.observe(sc, [v2])

    def states() -> list[str]:
        data = PinStore(store).list()
        return ["changed" if data[sc]["add"]["changed"] else "same" for sc in scopes]

    assert states() == ["changed"] * 3
    out = _pins(store, "list")
    assert "srv (identity alice of https://a.example)" in out.stdout, out.stdout
    r = _pins(store, "accept", "srv", "add", "--identity", "alice", "--issuer",
              "https://b.example")
    assert r.returncode == 0 and "1 pin set" in r.stdout, r.stdout + r.stderr
    assert states() == ["changed", "same", "changed"]
    r = _pins(store, "accept", "srv", "add", "--identity", "alice")
    assert r.returncode == 0 and "3 pin set" in r.stdout, r.stdout + r.stderr
    assert states() == ["same"] * 3


def test_a_pin_set_of_the_subject_alone_is_the_baseline_of_each_issuers_subject(
        tmp_path: Path) -> None:
    """Pins written before they were kept per issuer (`srv|alice`): a definition that
    changed since is still a change for each issuer's alice, not a fresh pin."""
    from addons.frame.principal import principal
    from addons.mcp.pins import PinStore, scope_key

    store = tmp_path / "pins.json"
    v1 = {"name": "add", "description": "Adds.", "inputSchema": {"type": "object"}}
    v2 = {**v1, "description": "Adds. And more."}
    PinStore(store).observe("srv|alice", [v1])
    a, b = (scope_key("srv", principal({"iss": iss, "sub": "alice"}), True)
            for iss in ("https://a.example", "https://b.example"))
    s = PinStore(store)
    s.refresh()
    assert s.status(a, "add") == ("same", [])          # a call before any new list
    assert s.observe(a, [v2])["add"][0] == "changed"
    assert s.observe(b, [v1])["add"][0] == "same"
    assert PinStore(store).observe(b, [v2])["add"][0] == "changed"
    other = scope_key("srv", principal({"iss": "https://a.example", "sub": "bob"}), True)
    assert PinStore(store).observe(other, [v2])["add"][0] == "new"

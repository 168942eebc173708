"""Body-named sessions (addons/recording/sessions.py): read before policy and masking."""

from __future__ import annotations

import gzip
import json

from mitmproxy.test import taddons, tflow

from addons import gateway
from addons.config.holder import RulesHolder
from addons.masking.addon import Masking
from addons.policy.addon import Policy
from addons.recording.addon import Recorder
from addons.recording.sessions import Sessions


def chat_flow(body: bytes, headers: dict | None = None):
    f = tflow.tflow()
    f.request.headers["content-type"] = "application/json"
    for k, v in (headers or {}).items():
        f.request.headers[k] = v
    f.request.raw_content = body
    # what the recorder's requestheaders left: no session header, connection fallback
    f.metadata["session"] = f"conn-{f.client_conn.id}"
    f.metadata["recorder"] = {"session_source": "connection"}
    return f


def test_runs_after_identity_before_policy_and_masking() -> None:
    names = [type(a) for a in gateway.build()]
    i = names.index(Sessions)
    assert names[i - 1].__name__ == "Identity"
    assert i < names.index(Policy) < names.index(Masking) < names.index(Recorder)


def test_body_session_header_wins_and_bad_bodies_pass() -> None:
    s = Sessions(RulesHolder())
    with taddons.context():
        f = chat_flow(json.dumps({"metadata": {"thread_id": "t-1"}}).encode())
        s.request(f)
        assert f.metadata["session"] == "t-1"
        assert f.metadata["recorder"]["session_source"] == "body:metadata.thread_id"
        # compressed: decoded (no pre-check on compressed bytes)
        g = chat_flow(gzip.compress(b'{"metadata": {"run_id": 7}}'),
                      {"content-encoding": "gzip"})
        s.request(g)
        assert g.metadata["session"] == "7"
        # a header named the session: the body does not override it
        h = chat_flow(json.dumps({"metadata": {"thread_id": "t-2"}}).encode())
        h.metadata.update(session="hdr", recorder={"session_source": "header:X-Agent-Session"})
        s.request(h)
        assert h.metadata["session"] == "hdr"
        # undecodable or not JSON: left to masking/policy, never refused here
        for bad in (chat_flow(b"\x1f\x8bnot gzip", {"content-encoding": "gzip"}),
                    chat_flow(b'{"metadata": {"thread_id": '),
                    chat_flow(b'{"metadata": {"thread_id": true}}')):
            s.request(bad)
            assert bad.response is None
            assert bad.metadata["session"].startswith("conn-")
        # a refused flow is still recorded under its thread
        r = chat_flow(json.dumps({"metadata": {"thread_id": "t-3"}}).encode())
        r.response = tflow.tresp(status_code=401)
        s.request(r)
        assert r.metadata["session"] == "t-3"

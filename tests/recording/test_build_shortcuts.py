"""Row building's shortcuts give what the long way gives, and a hostile body cannot turn its
own record into a minimal one.

- The request's `model` is read by orjson first, the json module where orjson refuses: the
  same value as json.loads for every body (duplicate keys, NaN, 1e400, integers past 64
  bits, lone surrogates, a BOM, trailing bytes, nesting past either parser's limit).
- A connection's certificate chain is serialised once per (secrets, chain): a flow whose
  credentials appear in the chain gets its own scrubbed copy, not another flow's text.
- A JSON body nested deeper than the json module reads (100,000 levels) is stored whole,
  unsplit: before, its RecursionError made the writer store the flow's minimal record.
- A snapshot the writer process read from a small frame is built from the frame's size and
  gate (store.Pending.frame) instead of measuring its state: the same row, for every
  metadata the writer's exactness tests use (NaN, infinities, bytes, odd floats, a secret
  in a key), with secrets and credentials to scrub, at a limit the frame's size answers
  and at one it does not; and no leaf grows past the bound that rule relies on.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest

from addons.recording import store, wire
from addons.recording.writerproc import build
from tests.recording.test_write_path import METAS, SECRET, _state

DEEP = 100_000


def _reference_model(body: bytes) -> Any:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc["model"][:200] if isinstance(doc, dict) and isinstance(doc.get("model"), str) \
        else None


BODIES = [
    b'{"model":"gpt-4o","messages":[]}',
    b'{"model":"a","model":"b"}',
    b'{"model":"m","x":NaN}',
    b'{"model":"m","x":1e400}',
    b'{"model":"m","x":123456789012345678901234567890}',
    b'{"model":"\\ud800x"}',
    b'{"model":"caf\\u00e9 \xe4\xb8\xad"}',
    b'{"model":"m"} ',
    b'{"model":"m"}\x00',
    b'{"model":"m"} {"model":"n"}',
    b'{"model":12}',
    b'{"model":"' + b"x" * 500 + b'"}',
    b'{"x":' + b"[" * 2000 + b"]" * 2000 + b',"model":"deep-ish"}',
    b'{"x":' + b"[" * DEEP + b"]" * DEEP + b',"model":"deep"}',
    b'\n{"model":"lead"}',
    b'{"model":"bad utf8 \xff"}',
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_the_model_is_what_json_loads_reads(body: bytes) -> None:
    assert store._model(body, None) == _reference_model(body)


def _pending(i: int, body: bytes, secrets: tuple[str, ...] = (),
             chain: list[Any] | None = None) -> store.Pending:
    st = _state(i, body, json.loads(json.dumps(METAS[0])), b'{"choices":[]}', 1.7e9 + i)
    if chain is not None:
        st["server_conn"] = dict(st["server_conn"], certificate_list=chain)
    return store.Pending(state=st, session="s", origin_url="https://api.example/v1/chat",
                         secrets=secrets, size=len(body))


def _certs(row: dict[str, Any]) -> bytes:
    blobs = {b[0]: b for b in row["_blobs"]}
    return store.blob_content(blobs, row["certs_ref"])


def test_a_chain_holding_a_flows_secret_is_scrubbed_for_that_flow() -> None:
    secret = "sk-chain-secret-0123456789abcdef"
    chain = ["-----BEGIN CERTIFICATE-----\n" + "B" * 300 + secret + "\n"]
    plain = build(_pending(1, b'{"model":"m"}', (), list(chain)))
    assert secret.encode() in _certs(plain)  # no secret known: the chain as it was
    scrubbed = build(_pending(2, b'{"model":"m"}', (secret,), list(chain)))
    assert secret.encode() not in _certs(scrubbed)
    assert scrubbed["certs_ref"] != plain["certs_ref"]
    again = build(_pending(3, b'{"model":"m"}', (secret,), list(chain)))
    assert _certs(again) == _certs(scrubbed) and again["certs_ref"] == scrubbed["certs_ref"]
    other = build(_pending(4, b'{"model":"m"}', (secret,), [chain[0].replace("B", "C")]))
    assert other["certs_ref"] != scrubbed["certs_ref"]


def test_a_body_nested_past_the_parsers_is_stored_whole() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":' + b"[" * DEEP \
        + b"]" * DEEP + b"}]}"
    row = build(_pending(5, body))
    assert row["outcome"] == "forwarded" and row["error"] is None
    assert row["flow_state"] is not None
    blobs = {b[0]: b for b in row["_blobs"]}
    assert store.blob_content(blobs, row["request_body_ref"]) == body


def _via_pipe(p: store.Pending, keep: int = 1 << 20) -> store.Pending:
    """p as the writer process gets it: framed, read back, its frame's facts attached."""
    r, w = os.pipe()
    try:
        os.write(w, wire.frame(wire.pending_msg(1, p)))
        os.close(w)
        reader = wire.FrameReader(r, keep=keep)
        msg, nbytes = reader.next()
    finally:
        os.close(r)
    got = wire.record_of(msg)[1]
    assert isinstance(got, store.Pending)
    if reader.frame is not None:
        got.frame = (nbytes, store.frame_plain(reader.frame))
    return got


@pytest.mark.parametrize("max_body", [256 * 1024, 4096, 100])
@pytest.mark.parametrize("meta", range(len(METAS)))
def test_a_frames_facts_build_the_row_measuring_builds(meta: int, max_body: int) -> None:
    st = _state(meta, b'{"model":"m","messages":[{"role":"user","content":"hi ' + SECRET.encode()
                + b'"}]}', copy.deepcopy(METAS[meta]), b'{"choices":[]}', 1.7e9 + 0.123456)
    p = store.Pending(state=st, session="s", origin_url="https://api.example/v1/chat",
                      secrets=(SECRET, f"Bearer {SECRET}"), max_body=max_body, size=100)
    got = _via_pipe(p)
    assert got.frame is not None
    if meta == 2:  # a NaN in the metadata: the frame's gate says so, as the state's would
        assert got.frame[1] is False
    measured = copy.deepcopy(got)
    measured.frame = None
    assert build(got) == build(measured)


def test_a_backups_body_decoded_past_the_limit_is_cut_as_measuring_cuts() -> None:
    """safe_state stores a compressed body holding a secret decoded, the backup's too:
    a frame's size does not bound that leaf, so a state with a backup is measured."""
    import gzip

    st = _state(3, b'{"model":"m"}', copy.deepcopy(METAS[0]), b"{}", 1.7e9)
    backup = copy.deepcopy(st)
    backup["request"]["headers"] = ((b"content-encoding", b"gzip"),)
    backup["request"]["content"] = gzip.compress(b"x" * 80_000 + SECRET.encode())
    st["backup"] = backup
    p = store.Pending(state=st, session="s", secrets=(SECRET,), max_body=60_000)
    got = _via_pipe(p)
    assert got.frame is not None and got.frame[0] * store.LEAF_GROWTH < 60_000
    measured = copy.deepcopy(got)
    measured.frame = None
    row = build(got)
    assert row == build(measured)
    stored = store.load_state(row["flow_state"])
    assert len(stored["backup"]["request"]["content"]) <= 60_000


def test_a_frame_larger_than_kept_is_measured_as_before() -> None:
    p = _pending(9, b'{"model":"m","x":"' + b"y" * 5000 + b'"}')
    assert _via_pipe(p, keep=1024).frame is None


def _longest_leaf(v: Any) -> int:
    if isinstance(v, str | bytes):
        return len(v)
    if isinstance(v, dict):
        return max([0, *(max(_longest_leaf(k), _longest_leaf(x)) for k, x in v.items())])
    if isinstance(v, list | tuple):
        return max([0, *(_longest_leaf(x) for x in v)])
    return 0


def test_no_leaf_grows_past_the_bound_the_frame_rule_relies_on() -> None:
    """The worst growths build_row applies to a snapshot's leaves: empty query values each
    redacted, one-byte credential header values, text that is nothing but the shortest
    secret, in headers, the path and the metadata (bodies are measured, not bounded)."""
    short = "s" * store.MIN_SECRET_LEN
    secrets = (short, "t" * 40)
    st = _state(1, b"{}", {"note": short * 200, short * 50: [short * 10]}, b"{}", 1.7e9)
    st["request"] = dict(st["request"],
                         path=b"/p?" + b"&".join([b"otp="] * 2000),
                         headers=((b"authorization", b"x"), (b"cookie", b""),
                                  (b"x-secret", short.encode() * 300)))
    st["comment"] = short * 100
    p = store.Pending(state=st, session="s", secrets=secrets)
    frame_size = len(wire.frame(wire.pending_msg(1, p)))
    safe = store.safe_state(p.state, p.redact, store.scrubber(secrets), store._identity_decode)
    for part in ("request", "response"):
        safe[part] = dict(safe[part], content=None)
    grown = _longest_leaf(safe)
    assert grown > _longest_leaf(p.state)  # the redaction did grow a leaf
    assert grown <= store.LEAF_GROWTH * frame_size + len(store.REDACTED)
    # and per leaf: no single one grows by more than the factor
    path = safe["request"]["path"]
    assert len(path) <= store.LEAF_GROWTH * len(st["request"]["path"]) + len(store.REDACTED)

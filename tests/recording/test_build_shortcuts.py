"""Row building's shortcuts give what the long way gives, and a hostile body cannot turn its
own record into a minimal one.

- The request's `model` is read by orjson first, the json module where orjson refuses: the
  same value as json.loads for every body (duplicate keys, NaN, 1e400, integers past 64
  bits, lone surrogates, a BOM, trailing bytes, nesting past either parser's limit).
- A connection's certificate chain is serialised once per (secrets, chain): a flow whose
  credentials appear in the chain gets its own scrubbed copy, not another flow's text.
- A JSON body nested deeper than the json module reads (100,000 levels) is stored whole,
  unsplit: before, its RecursionError made the writer store the flow's minimal record.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from addons.recording import store
from addons.recording.writerproc import build
from tests.recording.test_write_path import METAS, _state

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

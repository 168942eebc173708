"""Hostile review of issue 16's speed paths (PERF-AX): attacks on the shortcuts that held.
Each asserts the shortcut gives what the slow path gives, or that tampering is still seen:

- the audit chain read in seq windows (store.rows_by_seq): records renumbered into a gap,
  far past the window, to BIGINT's ends, or to NULL are still reported by verify;
- the writer's scrubbing of a flow's metadata from orjson's text (_scrub_metadata): see
  tests/recording/test_scrub_keys.py (a secret in a value held; one as a key did not);
- the prebuilt strict JSON decoder (decode.loads_strict): BOM, duplicate keys, NaN,
  huge and deep numbers, lone surrogates answer exactly as json.loads with the same hooks;
- the session's cache of response header sets found clean: a set that differs from a
  clean one in one value, in a name's case or by a repeated field is scanned again.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from addons.frame import decode
from addons.masking.addon import _masked_fields
from addons.masking.bodies import Masked, MessageCaches
from addons.masking.config import MaskingConfig
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session, session_key
from addons.recording import store
from addons.recording.addon import build

# ------------------------------------------------------------------ verify over windows


def _chain(tmp_path: Path, n: int) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    store.init_schema(con)
    rows = []
    for i in range(n):
        f = tflow.tflow(resp=True)
        f.request.content = json.dumps({"n": i}).encode()
        rows.append(build(store.Pending(state=f.get_state(), session="s")))
    store.append(con, rows, store.head(con))
    return con


@pytest.mark.parametrize("new_seq", [None, -1, 0, 2**63 - 1, 10_000, 7])
def test_a_renumbered_record_is_reported_by_verify(tmp_path: Path, new_seq) -> None:
    con = _chain(tmp_path, 12)
    assert store.verify(con, chunk=3).ok
    con.execute("UPDATE flows SET seq = ? WHERE seq = 5", [new_seq])
    got = store.verify(con, chunk=3)
    assert not got.ok and got.problem


def test_a_record_deleted_at_a_window_edge_is_reported(tmp_path: Path) -> None:
    con = _chain(tmp_path, 12)
    con.execute("DELETE FROM flows WHERE seq = 6")  # the first of the third window of 3
    got = store.verify(con, chunk=3)
    assert not got.ok and "deleted" in got.problem


# ------------------------------------------------------------------ strict decoder

_HOOKS = {"object_pairs_hook": decode._no_duplicates, "parse_float": decode.JsonFloat}


def _reference(text: str) -> object:
    try:
        return ("ok", json.loads(text, **_HOOKS))
    except decode.DuplicateKey:
        return ("dup",)
    except decode.NumberOutOfRange:
        return ("range",)
    except (ValueError, RecursionError):
        return ("bad",)


def _fast(text: str) -> object:
    try:
        return ("ok", decode.loads_strict(text))
    except decode.DecodeError as e:
        return {"JSON object with duplicate keys": ("dup",),
                "JSON number out of range (larger than a double)": ("range",)}.get(
                    e.reason, ("bad",))


CASES = ['\ufeff{"a":1}', '{"a":1,"a":2}', '{"a":NaN}', '[Infinity]', '[1e400]',
         '[' + '9' * 5000 + ']', '"\\ud800"', '{"\\ud83d\\ude00":1}', '[' * 100_000,
         '{"a":1} x', ' {"a": 1.50} ', '{"a":{"b":1,"b":1}}', '', '\u2028[1]']


@pytest.mark.parametrize("text", CASES)
def test_the_prebuilt_decoder_answers_as_json_loads(text: str) -> None:
    assert repr(_fast(text)) == repr(_reference(text))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text(alphabet='{}[]",:0123456789.eE-+ abtrueflsnNaI\\u\ufeff', max_size=30))
def test_the_prebuilt_decoder_answers_as_json_loads_on_any_text(text: str) -> None:
    assert repr(_fast(text)) == repr(_reference(text))


# ------------------------------------------------------------------ response header sets


def _ctx(caches: MessageCaches, masker: Masker, session: Session, who: str) -> Masked:
    return Masked(masker, session, {}, restorable=False, dialect="openai",
                  cache=caches.get(session_key(who, "conv"), session, masker))


def test_a_header_set_near_a_clean_one_is_scanned_again() -> None:
    from mitmproxy import http
    masker = Masker(DetectorSet(MaskingConfig()), b"k")
    caches, session = MessageCaches(), Session()
    passed = frozenset({"content-type", "date"})
    clean = [(b"x-request-id", b"req-1"), (b"x-note", b"all good")]
    assert _masked_fields(_ctx(caches, masker, session, "a"), http.Headers(clean),
                          passed) is None
    pii = "ann.lee@example.com"
    for fields in ([(b"x-request-id", b"req-1"), (b"x-note", pii.encode())],
                   [(b"X-Request-Id", b"req-1"), (b"x-note", b"all good"),
                    (b"x-note", pii.encode())],
                   [(b"x-request-id", b"req-1"), (b"x-note", b"all good"),
                    (b"x-" + pii.encode(), b"v")]):
        for who in ("a", "b"):  # the same session, and another identity's
            new = _masked_fields(_ctx(caches, masker, session, who), http.Headers(fields),
                                 passed)
            assert new is not None and pii.encode() not in b"".join(
                k + v for k, v in new), fields

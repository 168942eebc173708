"""The writer's faster write path (PERF-Y) stores exactly what the reference path stored.

The reference path is the code as it was before: every JSON text by the json module (the
chain's canonical form, the batches DuckDB parses), the state's metadata compared with the
`metadata` column by serialising and parsing it (`_same_metadata`'s slow branch), blobs
inserted with INSERT OR IGNORE, audit_meta set with an upsert. The same flows go through
both into two stores; every table, every export and `verify` must agree byte for byte.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.recording import store, writer
from addons.recording.writerproc import build as writer_build
from bench.bench_multiturn import conversation

SECRET = "sk-live-WRITEPATH-000000000000000000000"


def _reference_set_meta(con: Any, meta: dict[str, str]) -> None:
    con.execute("INSERT OR REPLACE INTO audit_meta VALUES "
                + ", ".join(["(?, ?)"] * len(meta)), [x for kv in meta.items() for x in kv])


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch):
    """Switch the store module to the reference write path (see the module docstring)."""
    def use() -> None:
        monkeypatch.setattr(store, "_orjson", None)
        monkeypatch.setattr(store, "_NOT_PLAIN", (b"",))  # (in every text: never the shortcut)
        monkeypatch.setattr(store, "INSERT_NEW_BLOBS", store.INSERT_BLOBS)
        monkeypatch.setattr(store, "_set_meta", _reference_set_meta)
    return use


def _state(i: int, body: bytes, meta: dict[str, Any], resp: bytes, t: float) -> dict:
    return {
        "id": f"flow-{i}", "type": "http", "is_replay": None, "comment": "", "marked": "",
        "timestamp_created": t, "metadata": meta, "error": None,
        "client_conn": {"peername": ("127.0.0.1", 5000 + i), "id": "c1",
                        "certificate_list": ["-----BEGIN CERTIFICATE-----\n" + "A" * 400]},
        "server_conn": {"address": ("127.0.0.1", 9443), "certificate_list": []},
        "request": {"host": "127.0.0.1", "port": 9443, "method": b"POST", "scheme": b"https",
                    "authority": b"", "path": b"/v1/chat/completions?token=abc&x=1",
                    "http_version": b"HTTP/1.1",
                    "headers": ((b"content-type", b"application/json"),
                                (b"authorization", f"Bearer {SECRET}".encode()),
                                (b"x-note", "caf\u00e9 \u2028".encode())),
                    "content": body, "trailers": None, "timestamp_start": t,
                    "timestamp_end": t + 0.001},
        "response": {"status_code": 200, "reason": b"OK", "http_version": b"HTTP/1.1",
                     "headers": ((b"content-type", b"application/json"),),
                     "content": resp, "trailers": None,
                     "timestamp_start": t + 0.01, "timestamp_end": t + 0.0123456},
    }


# metadata an addon may leave: plain JSON, floats the two encoders spell differently,
# integers past 64 bits, bytes, a secret in a key, a number holding a secret's digits,
# one-key dicts the state reader turns into other values
METAS: list[dict[str, Any]] = [
    {"identity": {"sub": "agent-1", "iss": "https://idp", "groups": ["a", "b"]},
     "decision": {"action": "allow", "rule": "r1"}, "findings": {"EMAIL": {"count": 2}},
     "upstream": {"name": "openai", "dialect": "openai"}},
    {"identity": {"sub": "agent-\u00e9\u4e2d\U0001f600", "iss": "i"}, "score": 1e-05,
     "big": 2 ** 70, "neg": -0.0, "inf": math.inf, "ctl": "a\x00b\x1f\x7fc\u2029"},
    {"identity": {"sub": "agent-2", "iss": "i"}, "nan": math.nan},
    {"identity": {"sub": "agent-3", "iss": "i"}, "raw": b"\xff\xfebytes", "set": [1, 2]},
    {"identity": {"sub": "agent-4", "iss": "i"}, SECRET: "in a key"},
    {"identity": {"sub": "agent-5", "iss": "i"}, "wrapped": {"$bytes": "x"},
     "h": {"$h": [["a", "b"]]}, "b": {"$b64": "QUJD"}},
    {"identity": {"sub": "agent-6", "iss": "i"}, "tuple": (1, "x", None, True)},
    {},
]


def _pendings(seed: int = 7) -> list[store.Pending]:
    rng = random.Random(seed)
    convs = [conversation(a, 8) for a in range(3)]
    out = []
    i = 0
    for turn in range(8):
        for a, conv in enumerate(convs):
            i += 1
            meta = json.loads(json.dumps(METAS[0]))
            meta["identity"]["sub"] = f"agent-{a}"
            out.append(store.Pending(
                state=_state(i, conv[turn], meta, b'{"choices":[{"message":{"content":"ok '
                             + str(turn).encode() + b'"}}]}', 1.7e9 + i * 0.37),
                session=f"agent-{a}", origin_url="https://api.openai.com/v1/chat/completions",
                secrets=(SECRET, f"Bearer {SECRET}"), size=len(conv[turn])))
    for k, meta in enumerate(METAS):
        i += 1
        body = bytes(rng.randrange(256) for _ in range(300)) if k % 2 else \
            json.dumps({"model": "m\u00e9", "messages": [{"role": "user",
                                                         "content": "x" * (5000 + k)}]},
                       ensure_ascii=False).encode()
        out.append(store.Pending(state=_state(i, body, meta, b"\x00\x01binary", 1.7e9 + i),
                                 session="odd", secrets=(SECRET, "1234567890123"),
                                 size=len(body)))
    return out


def _write(path: Path, batches: list[list[store.Pending]]) -> None:
    """What the writer process does with each batch: build, drop the blobs it knows are
    stored, chain and append (a second run of it starts knowing none)."""
    con = writer.open_db(path)
    try:
        for run in (batches[: len(batches) // 2], batches[len(batches) // 2:]):
            known = store.BlobCache()
            splits = store.SplitCache()
            head = store.head(con)
            for items in run:
                rows = [store.build_row(p, splits=splits) for p in items]
                for r in rows:
                    if r.get("_blobs"):
                        r["_blobs"] = [b for b in r["_blobs"] if b[0] not in known]
                head = store.append(con, rows, head, known,
                                    marks=[("writer-run:x", str(head[0] + len(rows)))])
    finally:
        con.close()


def _dump(path: Path) -> dict[str, Any]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()  # noqa: S608
               for t in ("flows", "blobs", "approvals", "audit_meta")}
        out["export"] = store.export_rows(con, None)
        out["sessions"] = {s: store.export_rows(con, s) for s in ("agent-0", "odd")}
        out["verify"] = store.verify(con).to_dict()
    finally:
        con.close()
    return out


def test_same_stores_and_exports_as_the_reference_path(tmp_path: Path, reference,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    items = _pendings()
    batches = [items[k:k + 5] for k in range(0, len(items), 5)]
    # the SplitCache and build mutate nothing of the pendings: the same objects serve both
    _write(tmp_path / "new.duckdb", batches)
    new = _dump(tmp_path / "new.duckdb")
    reference()
    _write(tmp_path / "ref.duckdb", batches)
    ref = _dump(tmp_path / "ref.duckdb")
    new_by_ref = _dump(tmp_path / "new.duckdb")["verify"]  # the reference's verify
    monkeypatch.undo()
    ref_by_new = _dump(tmp_path / "ref.duckdb")["verify"]  # this path's verify
    assert new_by_ref["ok"] and ref_by_new["ok"]
    assert new["verify"]["ok"] and ref["verify"]["ok"]
    assert new["verify"]["count"] == len(items)
    for key in ref:
        assert new[key] == ref[key], key
    # the odd metadata really went through the slow branch and the blobs were re-sent
    assert any(b'"$metadata"' not in bytes(r[0]) for r in
               [(row[store.ALL_NAMES.index("flow_state")],) for row in new["flows"]])


def test_writer_process_build_matches_the_reference(reference) -> None:
    items = _pendings(11)
    new = [writer_build(p) for p in items]
    reference()
    ref = [writer_build(p) for p in items]
    assert new == ref


def test_a_stored_blob_the_writer_does_not_know_is_written_again(tmp_path: Path) -> None:
    """The plain INSERT of new blobs fails on one already stored; the batch is written
    with INSERT OR IGNORE instead, whole (rows, blobs, head), once."""
    con = writer.open_db(tmp_path / "a.duckdb")
    items = _pendings(3)[:6]
    rows = [store.build_row(p) for p in items]
    head = store.append(con, rows[:3], store.head(con))
    shared = {b[0] for r in rows[:3] for b in r.get("_blobs") or ()}
    again = [store.build_row(p) for p in items[3:]]
    assert shared & {b[0] for r in again for b in r.get("_blobs") or ()}
    known = store.BlobCache()  # knows nothing: the stored blobs are sent
    head = store.append(con, again, head, known)
    assert known.unsure == store.BlobCache.UNSURE_BATCHES  # OR IGNORE for a while
    assert all(b[0] in known for r in again for b in r.get("_blobs") or ())
    assert con.execute("SELECT count(*) FROM flows").fetchone()[0] == 6
    assert con.execute("SELECT value FROM audit_meta WHERE key = 'head'").fetchone()[0] == \
        f"{head[0]}:{head[1]}"
    assert store.verify(con).ok
    con.close()


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) | \
    st.sampled_from(["\x00", "\x7f", "\u2028", "\ud7ff\ue000", '"\\/', "\U0010ffff"])
SCALAR = st.none() | st.booleans() | st.integers(-2 ** 80, 2 ** 80) | TEXT | \
    st.floats(allow_nan=True, allow_infinity=True) | \
    st.sampled_from([1e-05, 1e16, 1e22, 5e-324, 0.1, -0.0, 123456.789])
ROW = st.dictionaries(st.sampled_from(store.HASHED_COLUMNS), SCALAR | st.lists(SCALAR, max_size=4)
                      | st.dictionaries(TEXT, SCALAR, max_size=3), max_size=12)


@settings(max_examples=400, deadline=None)
@given(ROW)
def test_canonical_text_is_the_json_modules(row: dict[str, Any]) -> None:
    want = json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert store._canonical_text(row) == want  # noqa: SLF001
    # the chain's own call: the columns in sorted order, written without sorting
    ordered = dict(sorted(row.items()))
    assert store._canonical_written(ordered, ordered=True)[0] == want  # noqa: SLF001


@settings(max_examples=300, deadline=None)
@given(st.lists(ROW, max_size=4))
def test_batch_json_reads_as_the_json_modules(doc: list[dict[str, Any]]) -> None:
    try:
        want = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    except ValueError:
        with pytest.raises(ValueError):
            store._batch_json(doc)  # noqa: SLF001
        return
    got = store._batch_json(doc)  # noqa: SLF001
    assert json.loads(got) == json.loads(want)
    assert json.dumps(json.loads(got), sort_keys=True) == json.dumps(json.loads(want),
                                                                      sort_keys=True)


# one-key dicts the state reader cannot turn back (it raises): not the same when read
# back, so the state keeps its own copy (export cannot read such a row back either way)
UNREADABLE = {"identity": {"sub": "agent-7", "iss": "i"}, "bad": {"$h": 5}, "b": {"$b64": "!"}}


@pytest.mark.parametrize("meta", [*METAS[:-1], UNREADABLE])
@pytest.mark.parametrize("secrets", [(), (SECRET, "1234567890123"), ("agent-1\",",)])
def test_same_metadata_fast_branch_agrees(meta: dict[str, Any], secrets: tuple[str, ...]
                                          ) -> None:
    scrub = store.Scrubber(secrets)
    m = scrub.walk(meta)
    text = store.cjson(m)
    assert store._same_metadata(m, text, scrub, m) == \
        store._same_metadata(m, text, scrub)  # noqa: SLF001


def test_blob_cache_is_bounded_and_keeps_what_is_in_use() -> None:
    cache = store.BlobCache(size=100)
    cache.add(f"a{i}" for i in range(10))
    for i in range(1000):
        cache.add([f"x{i}"])
        assert "a3" in cache  # in use all along: never forgotten
        assert len(cache) <= 100
    assert "x0" not in cache and "a7" not in cache  # not used since: forgotten
    cache.clear()
    assert len(cache) == 0 and "a3" not in cache



def _reference_same_headers(pairs: Any, col: str) -> bool:
    plain = frozenset(range(0x20, 0x7F)) - {ord('"'), ord("\\")}
    text = []
    for pair in pairs:
        if (not isinstance(pair, list | tuple) or len(pair) != 2
                or not all(isinstance(x, bytes) and plain.issuperset(x) for x in pair)):
            return False
        text.append([pair[0].decode("ascii"), pair[1].decode("ascii")])
    return bool(json.loads(col) == text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12)), min_size=1,
                max_size=5))
def test_same_headers_agrees_with_the_reference(pairs: list[tuple[bytes, bytes]]) -> None:
    col = store._headers_json(pairs)  # noqa: SLF001
    assert col is not None
    assert store._same_headers(pairs, col) == _reference_same_headers(pairs, col)  # noqa: SLF001
    assert store._same_headers(pairs, col, pairs) == _reference_same_headers(pairs, col)  # noqa: SLF001

"""Content-addressed bodies (schema 2): a conversation's history is stored once, the chain
covers the blobs (edited or missing blobs are reported), exports and `flow_bodies` give back
exactly what was forwarded, and schema-1 stores stay readable and verifiable."""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from mitmproxy import io as mio
from mitmproxy.test import tflow

from addons.cli import main
from addons.recording import store

ANSWER = b'{"model":"gpt-4o-mini","choices":[]}'


def pending(i: int, *, body: bytes, session: str = "s1", t: float | None = None
            ) -> store.Pending:
    """A real mitmproxy flow's state (what the recorder snapshots), with this body."""
    f = tflow.tflow(resp=True)
    f.id = f"flow-{i}"
    f.request.scheme, f.request.host, f.request.port = "https", "127.0.0.1", 9443
    f.request.path = "/v1/chat/completions"
    f.request.headers["content-type"] = "application/json"
    f.request.content = body
    f.response.content = ANSWER
    t = time.time() if t is None else t
    f.request.timestamp_start = f.request.timestamp_end = t
    f.response.timestamp_start = f.response.timestamp_end = t
    return store.Pending(state=f.get_state(), session=session,
                         origin_url="https://api.openai.com/v1/chat/completions")


def chat(turn: int, *, indent: int | None = None, extra: dict | None = None,
         ascii_only: bool = False) -> bytes:
    """Turn `turn` of a conversation: the whole history is sent again every time."""
    msgs: list[dict] = [{"role": "system", "content": "You are a careful agent. " * 40}]
    for t in range(turn + 1):
        msgs.append({"role": "user", "content": f"question {t}: " + "why is the sky blue? " * 60
                     + "é ✓ \u2028"})
        if t < turn:
            msgs.append({"role": "assistant", "content": f"answer {t}: " + "scattering. " * 80})
    doc = {"model": "gpt-4o-mini", "messages": msgs, "temperature": 0.2, **(extra or {})}
    return json.dumps(doc, indent=indent, ensure_ascii=ascii_only).encode()


@pytest.fixture
def con(tmp_path: Path):
    c = duckdb.connect(str(tmp_path / "a.duckdb"))
    store.init_schema(c)
    yield c
    c.close()


def record(con, bodies: list[bytes], session: str = "s1", first: int = 0) -> None:
    rows = [store.build_row(pending(first + i, body=b, session=session))
            for i, b in enumerate(bodies)]
    store.append(con, rows, store.head(con))


def stored_bytes(con) -> int:
    return con.execute("SELECT coalesce(sum(octet_length(data)), 0) + 200 * count(*) "
                       "FILTER (WHERE data IS NULL) FROM blobs").fetchone()[0]


# ---------------------------------------------------------------- splitting
def test_split_is_exact_and_cuts_at_messages() -> None:
    for body in (chat(3), chat(3, ascii_only=True), chat(3, indent=2),
                 chat(2, extra={"tools": [{"a": 1}, {"b": [2]}]}),
                 b'{"messages": [ {"x": "]"} , {"y": "\\"[,"} ] , "z": [1, 2]}'):
        pieces = store.split_body(body)
        assert b"".join(pieces) == body
        assert len(pieces) > 3
    # one piece per message (with the separator before it), the document around them
    pieces = store.split_body(chat(1))
    msgs = [p for p in pieces if b'"role"' in p]
    assert len(msgs) == 4 and all(p.count(b'"role"') == 1 for p in msgs)
    assert msgs[0].startswith(b'{"role"')
    assert all(p.startswith(b', {"role"') and p.endswith(b"}") for p in msgs[1:])
    # the next turn re-uses every piece of this one but the document's tail
    nxt = store.split_body(chat(2))
    assert pieces[:-1] == nxt[:len(pieces) - 1] and pieces[-1] == nxt[-1]
    assert len(nxt) == len(pieces) + 2


@pytest.mark.parametrize("body", [b"", b"[1, 2]", b"not json", b'{"messages": [1, 2',
                                  b'{"messages": [1 2]}', b"\xff\xfe{}", b'{"a": 1} trailing',
                                  b'{"messages": []}', b'{"messages": "text"}'])
def test_anything_else_is_one_piece_or_exact(body: bytes) -> None:
    pieces = store.split_body(body)
    assert b"".join(pieces) == body


@settings(max_examples=300, deadline=None)
@given(hs.recursive(hs.none() | hs.booleans() | hs.integers() | hs.text(),
                    lambda kids: hs.lists(kids, max_size=4)
                    | hs.dictionaries(hs.text(max_size=8), kids, max_size=4), max_leaves=20),
       hs.sampled_from([None, 0, 2]), hs.booleans())
def test_split_roundtrips_any_json(value, indent, ascii_only) -> None:
    doc = {"model": "m", "messages": value if isinstance(value, list) else [value],
           "input": [value, value]}
    body = json.dumps(doc, indent=indent, ensure_ascii=ascii_only).encode()
    assert b"".join(store.split_body(body)) == body
    blobs: dict[str, store.Blob] = {}
    assert store.blob_content(blobs, store.blob_tree(body, blobs)) == body


# ---------------------------------------------------------------- storage
def test_a_conversation_is_stored_with_its_new_content(con) -> None:
    turns = [chat(t) for t in range(1, 25)]
    record(con, turns)
    # distinct content: every message once (the last turn holds them all) + the answers
    distinct = len(turns[-1]) + len(ANSWER) * len(turns)
    sent = sum(len(b) for b in turns)
    kept = stored_bytes(con)
    assert kept <= 2 * distinct, (kept, distinct)
    assert sent > 8 * kept  # before: every turn stored whole (and again in flow_state)
    # the bodies are not also kept inline nor inside flow_state
    inline = con.execute("SELECT coalesce(sum(octet_length(request_body)), 0), "
                         "max(octet_length(flow_state)) FROM flows").fetchone()
    assert inline[0] == 0 and inline[1] < 4000
    assert store.verify(con).ok


def test_flow_bodies_and_export_give_back_what_was_forwarded(con, tmp_path: Path) -> None:
    bodies = [chat(t, indent=2 if t == 2 else None) for t in range(1, 5)] + [b"small"]
    record(con, bodies)
    got = con.execute("SELECT request_body FROM flow_bodies ORDER BY seq").fetchall()
    assert [bytes(r[0]) for r in got] == bodies
    con.close()
    db = tmp_path / "a.duckdb"
    out = tmp_path / "s1.mitm"
    assert main(["export", "--db", str(db), "--session", "s1", "-o", str(out)]) == 0
    with open(out, "rb") as fh:
        flows = list(mio.FlowReader(fh).stream())
    assert [f.request.content for f in flows] == bodies
    assert all(f.response.content == ANSWER for f in flows)


# ---------------------------------------------------------------- tamper evidence
@pytest.fixture
def filled(con):
    record(con, [chat(t) for t in range(1, 6)])
    assert store.verify(con).ok
    return con


def test_an_edited_leaf_is_reported(filled) -> None:
    filled.execute("UPDATE blobs SET data = replace(data::VARCHAR, 'scattering',"
                   " 'absorption')::BLOB WHERE data IS NOT NULL AND "
                   "contains(data::VARCHAR, 'scattering')")
    r = store.verify(filled)
    assert not r.ok and r.problem.startswith("edited: blob"), r.problem


def test_swapped_node_parts_are_reported(filled) -> None:
    a, b = filled.execute("SELECT hash, part FROM blobs WHERE data IS NULL LIMIT 2").fetchall()
    filled.execute("UPDATE blobs SET part = ? WHERE hash = ?", [b[1], a[0]])
    r = store.verify(filled)
    assert not r.ok and "does not match its address" in r.problem


@pytest.mark.parametrize("which", ["leaf", "node", "root"])
def test_a_missing_blob_is_reported(filled, which: str) -> None:
    if which == "root":
        ref = filled.execute("SELECT request_body_ref FROM flows WHERE seq = 3").fetchone()[0]
    elif which == "node":
        ref = filled.execute("SELECT prev FROM blobs WHERE prev IS NOT NULL LIMIT 1"
                             ).fetchone()[0]
    else:
        ref = filled.execute("SELECT part FROM blobs WHERE part IS NOT NULL LIMIT 1"
                             ).fetchone()[0]
    filled.execute("DELETE FROM blobs WHERE hash = ?", [ref])
    r = store.verify(filled)
    assert not r.ok and r.problem.startswith("missing: blob") and ref in r.problem, r.problem
    if which == "root":
        assert r.seq == 3
    with pytest.raises(store.BlobMissing):
        for (seq,) in filled.execute("SELECT seq FROM flows").fetchall():
            for part in ("request", "response"):
                ref2 = filled.execute(f"SELECT {part}_body_ref FROM flows WHERE seq = ?",
                                      [seq]).fetchone()[0]
                if ref2:
                    store.read_blob(filled, ref2)


def test_a_redirected_reference_is_reported(filled) -> None:
    # pointing a record at another (valid) body breaks that record's hash
    other = filled.execute("SELECT request_body_ref FROM flows WHERE seq = 2").fetchone()[0]
    filled.execute("UPDATE flows SET request_body_ref = ? WHERE seq = 4", [other])
    r = store.verify(filled)
    assert not r.ok and r.seq == 4 and r.problem.startswith("edited: record seq 4")


# ---------------------------------------------------------------- retention
def test_retention_deletes_only_unreachable_blobs(con) -> None:
    old = time.time() - 10 * 86400
    rows = [store.build_row(pending(i, body=chat(i + 1, extra={"n": "old"}), t=old + i))
            for i in range(3)]
    store.append(con, rows, store.head(con))
    record(con, [chat(t) for t in range(1, 4)], first=10)
    before = con.execute("SELECT count(*) FROM blobs").fetchone()[0]
    assert store.apply_retention(con, 5) == 3
    after = con.execute("SELECT count(*) FROM blobs").fetchone()[0]
    assert 0 < after < before
    assert store.verify(con).ok
    got = con.execute("SELECT request_body FROM flow_bodies ORDER BY seq").fetchall()
    assert [bytes(r[0]) for r in got] == [chat(t) for t in range(1, 4)]


# ---------------------------------------------------------------- schema 1 stores
def schema1_store(path: Path) -> None:
    """A store as the gateway wrote it before schema 2: big bodies inline, bodies inside
    flow_state, no blobs table, no reference columns, schema_version 1."""
    c = duckdb.connect(str(path))
    cols = ", ".join(f"{n} {t}" for n, t in store.FLOW_COLUMNS)
    c.execute(f"CREATE TABLE flows ({cols})")
    c.execute("CREATE TABLE approvals (id VARCHAR, flow_id VARCHAR, requester VARCHAR, "
              "rule VARCHAR, requested_at TIMESTAMP, decided_at TIMESTAMP, decision VARCHAR, "
              "approvers VARCHAR[], reason VARCHAR)")
    c.execute("CREATE TABLE chain_checkpoints (seq BIGINT, hash VARCHAR, purged_rows BIGINT, "
              "cutoff TIMESTAMP, created TIMESTAMP)")
    c.execute("CREATE TABLE audit_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    c.execute("INSERT INTO audit_meta VALUES ('schema_version', '1')")
    seq, prev = 0, store.GENESIS
    for i in range(3):
        row = store.build_row(pending(i, body=chat(i + 1)))
        state = store.row_state(row)
        row = {k: row.get(k) for k in store.COLUMN_NAMES}
        row["request_body"] = state["request"]["content"]
        row["flow_state"] = store.dump_state(state, store.Scrubber())
        seq += 1
        row.update(seq=seq, prev_hash=prev)
        row["hash"] = prev = store.chain_hash(prev, row)
        c.execute(store.INSERT_FLOWS, [[row.get(k)] for k in store.COLUMN_NAMES])
    c.execute("INSERT INTO audit_meta VALUES ('head', ?)", [f"{seq}:{prev}"])
    c.close()


def test_a_schema1_store_stays_readable_and_verifiable(tmp_path: Path, capsys) -> None:
    db = tmp_path / "old.duckdb"
    schema1_store(db)
    # read-only, not migrated: verify and export work
    assert main(["audit", "verify", "--db", str(db)]) == 0
    assert "3 records verified" in capsys.readouterr().out
    out = tmp_path / "old.mitm"
    assert main(["export", "--db", str(db), "--session", "s1", "-o", str(out)]) == 0
    with open(out, "rb") as fh:
        assert [f.request.content for f in mio.FlowReader(fh).stream()] == \
            [chat(i + 1) for i in range(3)]
    # opened by a newer gateway: migrated in place, old rows still verify, new rows chain on
    c = duckdb.connect(str(db))
    store.init_schema(c)
    assert c.execute("SELECT value FROM audit_meta WHERE key = 'schema_version'"
                     ).fetchone() == (str(store.SCHEMA_VERSION),)
    record(c, [chat(t) for t in range(4, 7)], first=3)
    r = store.verify(c)
    assert r.ok and r.count == 6, r.problem
    got = c.execute("SELECT request_body FROM flow_bodies ORDER BY seq").fetchall()
    assert [bytes(x[0]) for x in got] == [chat(t) for t in range(1, 7)]
    # an edit of an old row's inline body is still caught
    c.execute("UPDATE flows SET request_body = 'x' WHERE seq = 2")
    assert not store.verify(c).ok
    c.close()


@pytest.mark.parametrize("body", [
    chat(3), chat(3, extra={"model": "second-wins"}), chat(3, indent=2),
    chat(3).replace(b'"model": "gpt-4o-mini", ', b"") + b"",
    chat(3).replace(b'"gpt-4o-mini"', b"42"), chat(3) + b" trailing",
    b"\t" + chat(3)])
def test_model_read_while_splitting_is_what_parsing_finds(body: bytes) -> None:
    """The row's model comes from the split's walk over a big request body (one parse, not
    two); it must be exactly what parsing the body found before."""
    def parsed() -> str | None:  # the previous definition
        for b in (body, ANSWER):
            if b[:1] not in (b"{", b" ", b"\n"):
                continue
            try:
                doc = json.loads(b)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("model"), str):
                return doc["model"][:200]
        return None

    row = store.build_row(pending(1, body=body))
    assert row["model"] == parsed()

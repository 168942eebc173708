"""`agentgate export` and `agentgate audit …` on a store file (gateway stopped): the .mitm file
mitmproxy reads back, origin restored, credentials gone; verify exit codes on tampering."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from mitmproxy import io as mio
from mitmproxy.test import tflow

from addons.cli import main
from addons.recording import store
from addons.recording.addon import build

REAL = "sk-proj-EXPORTREALKEY-0000000000000000000000"


def flow_pending(i: int, session: str = "s1") -> store.Pending:
    f = tflow.tflow(resp=True)
    f.request.scheme, f.request.host, f.request.port = "https", "127.0.0.1", 9443
    f.request.headers["host"] = "api.openai.com"
    f.request.path = "/v1/chat/completions"
    f.request.content = json.dumps({"model": "m", "n": i}).encode()
    f.request.headers["authorization"] = f"Bearer {REAL}"
    f.response.content = b'{"ok": true}'
    return store.Pending(state=f.get_state(), session=session,
                         origin_url="https://api.openai.com/v1/chat/completions",
                         secrets=(REAL,))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "agentgate.duckdb"
    con = duckdb.connect(str(path))
    store.init_schema(con)
    rows = [build(flow_pending(i, "s1" if i < 3 else "s2")) for i in range(5)]
    store.append(con, rows, store.head(con))
    con.close()
    return path


def test_export_roundtrip(db: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s1.mitm"
    assert main(["export", "--db", str(db), "--session", "s1", "-o", str(out)]) == 0
    assert "wrote 3 flows" in capsys.readouterr().out
    with open(out, "rb") as fh:
        flows = list(mio.FlowReader(fh).stream())
    assert [json.loads(f.request.content)["n"] for f in flows] == [0, 1, 2]
    f = flows[0]
    assert (f.request.scheme, f.request.host, f.request.port) == ("https", "api.openai.com", 443)
    assert "authorization" not in f.request.headers  # redacted credentials are dropped
    assert f.response.content == b'{"ok": true}'
    assert REAL.encode() not in out.read_bytes()


def test_export_as_forwarded_and_via(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "fwd.mitm"
    assert main(["export", "--db", str(db), "--all", "--as-forwarded",
                 "--via", "http://127.0.0.1:8080", "-o", str(out)]) == 0
    with open(out, "rb") as fh:
        flows = list(mio.FlowReader(fh).stream())
    assert len(flows) == 5
    assert (flows[0].request.host, flows[0].request.port) == ("127.0.0.1", 9443)
    assert str(flows[0].client_conn.proxy_mode.full_spec) == "upstream:http://127.0.0.1:8080"


def test_export_unknown_session_fails(db: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", "--db", str(db), "--session", "nope", "-o",
                 str(tmp_path / "x.mitm")]) == 1
    assert "no recorded flows" in capsys.readouterr().err


def test_verify_exit_codes(db: Path, capsys) -> None:
    assert main(["audit", "verify", "--db", str(db)]) == 0
    assert "5 records verified" in capsys.readouterr().out
    assert main(["audit", "verify", "--db", str(db), "--head", "0" * 64]) == 1
    con = duckdb.connect(str(db))
    con.execute("UPDATE flows SET request_body = 'x' WHERE seq = 2")
    con.close()
    assert main(["audit", "verify", "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert "TAMPERED: edited: record seq 2" in err


def test_query_and_sessions_direct(db: Path, capsys) -> None:
    assert main(["audit", "query", "--db", str(db), "--format", "csv",
                 "SELECT session_id, count(*) AS n FROM flows GROUP BY 1 ORDER BY 1"]) == 0
    assert capsys.readouterr().out.splitlines() == ["session_id,n", "s1,3", "s2,2"]
    assert main(["audit", "sessions", "--db", str(db), "--format", "json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {x["session_id"]: x["flows"] for x in lines} == {"s1": 3, "s2": 2}
    assert main(["audit", "query", "--db", str(db), "DROP TABLE flows"]) == 1
    assert "read-only" in capsys.readouterr().err
    assert main(["audit", "query", "--db", str(db.parent / "missing.duckdb"), "SELECT 1"]) == 1


def test_since_parsing() -> None:
    import time

    from addons.recording.cli import parse_since
    assert abs(parse_since("2h") - (time.time() - 7200)) < 5
    assert parse_since("2026-01-01T00:00:00") == 1767225600.0
    with pytest.raises(Exception):
        parse_since("yesterday-ish")


def test_export_pages_give_every_flow_once_in_order(tmp_path: Path, capsys,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An export is read a page at a time (the CLI asks again after each page); with pages of
    4 flows, 2 sessions interleaved and seq gaps (a purged middle), the file holds each of the
    session's flows once, in recorded order — as one read of everything gives."""
    from addons.recording import cli, writer
    path = tmp_path / "agentgate.duckdb"
    con = duckdb.connect(str(path))
    store.init_schema(con)
    rows = [build(flow_pending(i, "s1" if i % 3 else "s2")) for i in range(30)]
    store.append(con, rows, store.head(con))
    con.execute("DELETE FROM flows WHERE seq BETWEEN 10 AND 14")  # a gap inside a page
    whole = store.export_rows(con, "s1")
    pages, after = [], None
    while True:
        resp = writer.handle_op(con, {"op": "export", "session": "s1", "since": None,
                                      "after": after, "limit": 4})
        pages.append(resp["rows"])
        after = resp["next"]
        if after is None:
            break
    con.close()
    assert len(pages) > 3 and all(len(p) <= 4 for p in pages)
    assert [r for p in pages for r in p] == whole
    monkeypatch.setattr(cli, "EXPORT_PAGE", 4)
    out = tmp_path / "s1.mitm"
    assert main(["export", "--db", str(path), "--session", "s1", "-o", str(out)]) == 0
    with open(out, "rb") as fh:
        ns = [json.loads(f.request.content)["n"] for f in mio.FlowReader(fh).stream()]
    assert ns == [i for i in range(30) if i % 3 and not 9 <= i <= 13]
    assert f"wrote {len(ns)} flows" in capsys.readouterr().out


def test_metadata_that_looks_like_a_stored_tag_exports(tmp_path: Path) -> None:
    """A flow whose metadata holds objects shaped like dump_state's one-key tags ("$h",
    "$bytes", "$b64") but not of their form is exported with that metadata as it was; the
    export of its session failed (TypeError) before."""
    odd = {"a": {"$h": "not pairs"}, "b": {"$h": [["x"]]}, "c": {"$b64": "!!"},
           "d": {"$bytes": 5}, "e": {"$h": [[1, 2]]}}
    p = flow_pending(0)
    p.state["metadata"] = {**(p.state.get("metadata") or {}), "odd": odd}
    path = tmp_path / "agentgate.duckdb"
    con = duckdb.connect(str(path))
    store.init_schema(con)
    store.append(con, [build(p)], store.head(con))
    assert store.verify(con).ok
    con.close()
    out = tmp_path / "s1.mitm"
    assert main(["export", "--db", str(path), "--session", "s1", "-o", str(out)]) == 0
    with open(out, "rb") as fh:
        (flow,) = list(mio.FlowReader(fh).stream())
    assert flow.metadata["odd"] == odd


def test_a_record_without_a_seq_is_exported_whatever_the_page_size(tmp_path: Path) -> None:
    """A record whose seq was set NULL (an edited file: verify reports it) is still in the
    export, last as one read in seq order (NULLS LAST) puts it: pages after the first asked
    only `seq > after`, which no NULL seq is, so a store of more than one page exported
    without it (hidden from an export that one read of everything gave whole)."""
    from addons.recording import writer
    path = tmp_path / "agentgate.duckdb"
    con = duckdb.connect(str(path))
    store.init_schema(con)
    store.append(con, [build(flow_pending(i)) for i in range(9)], store.head(con))
    con.execute("UPDATE flows SET seq = NULL WHERE seq IN (2, 5)")
    whole = [r[0] for r in con.execute("SELECT id FROM flows WHERE flow_state IS NOT NULL "
                                       "ORDER BY seq NULLS LAST").fetchall()]
    assert len(whole) == 9
    for limit in (1, 2, 3, 4, 7, 500):
        ids, after = [], None
        while True:
            resp = writer.handle_op(con, {"op": "export", "session": None, "since": None,
                                          "after": after, "limit": limit})
            ids += [r[0] for r in resp["rows"]]
            after = resp["next"]
            if after is None:
                break
        assert sorted(ids) == sorted(whole), limit
        assert ids[:7] == whole[:7]  # the numbered ones in order, then the two without
    assert sorted(r[0] for r in store.export_rows(con, None)) == sorted(whole)
    con.close()

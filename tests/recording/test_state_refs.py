"""Parts of a flow state stored once per record: the state's metadata is the `metadata`
column's and reads `{"$metadata": "column"}` in `flow_state`; every reader (row_state,
export, `agentgate export`) puts it back, and the hash chain covers it through the column."""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pytest
from mitmproxy import io as mio
from mitmproxy.test import tflow

from addons.cli import main
from addons.recording import store

META = {
    "identity": {"sub": "agent-7", "iss": "https://idp.example", "groups": ["agents"],
                 "roles": [], "jti": "jti-123", "token_hash": "5efa0e9a29335696b357dae3fe5acf15",
                 "exp": 1796168729, "source": "proxy"},
    "session": "s1",
    "decision": {"action": "allow", "rule": "agents-may-use-models", "message": "",
                 "observed": False},
    "findings": {"EMAIL": {"count": 2, "strategy": "placeholder"}},
    "upstream": {"name": "openai", "dialect": "openai", "stripped": [],
                 "injected": "authorization"},
    "ratio": 0.25, "unicode": "é ✓",
}


def pending(i: int, meta: dict, *, resp_body: bytes = b'{"choices":[]}',
            max_body: int | None = None) -> store.Pending:
    f = tflow.tflow(resp=True)
    f.id = f"flow-{i}"
    f.request.scheme, f.request.host, f.request.port = "https", "127.0.0.1", 9443
    f.request.path = "/v1/chat/completions"
    f.request.content = b'{"model":"m","messages":[]}'
    f.response.content = resp_body
    f.request.timestamp_start = f.request.timestamp_end = time.time()
    st = f.get_state()
    st["metadata"] = dict(meta)  # as the snapshot carries it (bytes values included)
    p = store.Pending(state=st, session="s1")
    if max_body is not None:
        p.max_body = max_body
    return p


def test_metadata_is_stored_once_and_read_back_exactly() -> None:
    row = store.build_row(pending(1, META))
    assert json.loads(row["metadata"]) == META
    raw = bytes(row["flow_state"])
    assert b"token_hash" not in raw and b"agents-may-use-models" not in raw
    assert b'"$metadata"' in raw
    assert store.row_state(row)["metadata"] == META


@pytest.mark.parametrize("meta, by_ref", [
    ({**META, "raw": b"text bytes"}, False),  # the column reads them back as a str
    ({**META, "raw": b"\xff\x00bytes"}, True),  # both tag them {"$b64": ...}
    ({**META, "tuple": ("a", 1)}, True),  # both store a list
])
def test_metadata_by_reference_only_when_it_reads_back_the_same(meta, by_ref) -> None:
    row = store.build_row(pending(2, meta))
    assert (b'"$metadata"' in bytes(row["flow_state"])) is by_ref
    # whichever way it was stored, reading gives what the state itself would have given
    alone = store.load_state(store.dump_state({"m": meta}, store.Scrubber()))["m"]
    assert store.row_state(row)["metadata"] == alone
    assert isinstance(store.row_state(row)["metadata"].get("raw", b""), bytes)


def test_state_cuts_keep_their_own_metadata() -> None:
    # a body cut in the state lists the cut in the state's metadata only: not the column's
    row = store.build_row(pending(3, META, resp_body=b"x" * 5000, max_body=1024))
    raw = bytes(row["flow_state"])
    assert b'"$metadata"' not in raw and b"agentgate_truncated" in raw
    assert store.row_state(row)["metadata"]["identity"] == META["identity"]


def test_export_and_verify_cover_the_metadata(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    con = duckdb.connect(str(db))
    store.init_schema(con)
    store.append(con, [store.build_row(pending(i, META)) for i in range(3)], store.head(con))
    assert store.verify(con).ok
    con.close()
    out = tmp_path / "s1.mitm"
    assert main(["export", "--db", str(db), "--session", "s1", "-o", str(out)]) == 0
    with open(out, "rb") as fh:
        flows = list(mio.FlowReader(fh).stream())
    assert len(flows) == 3
    assert all(f.metadata["identity"] == META["identity"] for f in flows)
    assert all(f.metadata["decision"] == META["decision"] for f in flows)
    # the column the state refers to is hashed with the record: an edit is found
    con = duckdb.connect(str(db))
    con.execute("""UPDATE flows SET metadata = '{"session":"forged"}' WHERE seq = 2""")
    res = store.verify(con)
    con.close()
    assert not res.ok and res.seq == 2


def test_a_missing_metadata_column_fails_loudly() -> None:
    row = store.build_row(pending(4, META))
    row["metadata"] = None
    with pytest.raises(store.BlobMissing):
        store.row_state(row)


def test_header_blocks_are_stored_once_and_read_back_exactly() -> None:
    p = pending(5, META)
    p.state["request"]["headers"] = ((b"Host", b"api.example"), (b"X-Agent-Session", b"s1"),
                                     (b"authorization", b"Bearer sk-live-0123456789"))
    row = store.build_row(p)
    raw = bytes(row["flow_state"])
    assert raw.count(b'"$headers"') == 2 and b"X-Agent-Session" not in raw
    st = store.row_state(row)
    assert [tuple(h) for h in st["request"]["headers"]] == [
        (b"Host", b"api.example"), (b"X-Agent-Session", b"s1"),
        (b"authorization", b"[REDACTED]")]
    assert b"sk-live" not in raw and b"sk-live" not in row["request_headers"].encode()
    row["request_headers"] = None
    with pytest.raises(store.BlobMissing):
        store.row_state(row)


@pytest.mark.parametrize("value", [b"caf\xc3\xa9", b"\xe9t\xe9", b'say "hi"', b"a\\b",
                                   b"tab\there"])
def test_headers_the_column_would_change_stay_in_the_state(value: bytes) -> None:
    p = pending(6, META)
    p.state["request"]["headers"] = ((b"Host", b"api.example"), (b"X-Note", value))
    row = store.build_row(p)
    assert b"X-Note" in bytes(row["flow_state"])
    st = store.row_state(row)
    assert [tuple(h) for h in st["request"]["headers"]] == [
        (b"Host", b"api.example"), (b"X-Note", value)]


def test_export_gives_back_the_headers(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    con = duckdb.connect(str(db))
    store.init_schema(con)
    rows = []
    for i, v in enumerate((b"plain", b"caf\xc3\xa9")):
        p = pending(10 + i, META)
        p.state["request"]["headers"] = ((b"Host", b"api.example"), (b"X-Note", v))
        rows.append(store.build_row(p))
    store.append(con, rows, store.head(con))
    assert store.verify(con).ok
    con.close()
    out = tmp_path / "s1.mitm"
    assert main(["export", "--db", str(db), "--session", "s1", "-o", str(out)]) == 0
    with open(out, "rb") as fh:
        flows = list(mio.FlowReader(fh).stream())
    assert [f.request.headers.fields[-1] for f in flows] == [
        (b"X-Note", b"plain"), (b"X-Note", b"caf\xc3\xa9")]
    want = tuple(tuple(h) for h in pending(0, META).state["response"]["headers"])
    assert all(f.response.headers.fields == want for f in flows)


# ---------------------------------------------------------------- certificate chains
def _pem(cn: str) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


CHAIN = [_pem("upstream.example"), _pem("intermediate.example")]


def with_certs(i: int, chain: list[bytes] = CHAIN) -> store.Pending:
    p = pending(i, META)
    p.state["server_conn"] = dict(p.state["server_conn"], certificate_list=list(chain))
    return p


def test_certificate_chains_are_one_blob_per_distinct_chain() -> None:
    a, b = store.build_row(with_certs(20)), store.build_row(with_certs(21))
    assert a["certs_ref"] and a["certs_ref"] == b["certs_ref"]
    assert b"BEGIN CERTIFICATE" not in bytes(a["flow_state"])
    assert store.row_state(a)["server_conn"]["certificate_list"] == CHAIN
    # the chain's address is hashed with the record
    c = dict(b, certs_ref=store.leaf_address(b"other"))
    assert store.canonical(c) != store.canonical(b)
    # a short (or no) chain stays where it was
    assert store.build_row(pending(22, META))["certs_ref"] is None


@pytest.fixture
def certs_db(tmp_path: Path):
    db = tmp_path / "a.duckdb"
    con = duckdb.connect(str(db))
    store.init_schema(con)
    store.append(con, [store.build_row(with_certs(30 + i)) for i in range(3)], store.head(con))
    assert store.verify(con).ok
    yield con, db
    con.close()


def test_export_puts_the_certificates_back(certs_db, tmp_path: Path) -> None:
    con, db = certs_db
    con.close()
    out = tmp_path / "s1.mitm"
    assert main(["export", "--db", str(db), "--session", "s1", "-o", str(out)]) == 0
    with open(out, "rb") as fh:
        flows = list(mio.FlowReader(fh).stream())
    assert len(flows) == 3
    assert all([c.to_pem() for c in f.server_conn.certificate_list] == CHAIN for f in flows)


def test_an_edited_or_missing_certificate_blob_is_reported(certs_db) -> None:
    con, _db = certs_db
    ref = con.execute("SELECT certs_ref FROM flows WHERE seq = 1").fetchone()[0]
    con.execute("UPDATE blobs SET data = CAST('forged' AS BLOB) WHERE hash = ?", [ref])
    r = store.verify(con)
    assert not r.ok and r.problem.startswith("edited: blob"), r.problem
    con.execute("DELETE FROM blobs WHERE hash = ?", [ref])
    r = store.verify(con)
    assert not r.ok and "missing: blob" in r.problem and "certificates" in r.problem, r.problem


def test_retention_keeps_a_chain_while_a_record_refers_to_it(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "r.duckdb"))
    store.init_schema(con)
    old, new = time.time() - 10 * 86400, time.time()
    rows = []
    for i, (t, chain) in enumerate([(old, CHAIN), (old, CHAIN[:1]), (new, CHAIN)]):
        p = with_certs(40 + i, chain)
        p.state["request"]["timestamp_start"] = t
        p.state["response"]["timestamp_end"] = t + 0.01
        p.recorded_at = t
        rows.append(store.build_row(p))
    store.append(con, rows, store.head(con))
    assert store.apply_retention(con, 5, now=time.time()) == 2
    refs = {r[0] for r in con.execute("SELECT hash FROM blobs").fetchall()}
    assert rows[2]["certs_ref"] in refs and rows[1]["certs_ref"] not in refs
    assert store.verify(con).ok
    con.close()

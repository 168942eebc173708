"""addons/database/rowmask.py against a real PostgreSQL server and real clients (psql,
psycopg 3 text/binary/pipeline/prepared, asyncpg binary/prepared), through a minimal relay
(tests/database/pgkit_b.py) that runs only the result masker: emails and cards masked in
text and binary format, column rules that survive aliases, values that cannot hold a
placeholder turned NULL, uninspectable binary results refused with the session still usable,
errors and notices masked, per-statement results for the records."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from collections.abc import Iterator

import psycopg
import pytest

from addons.database import rowmask
from addons.masking.config import MaskingConfig
from tests.database.pgkit_b import MaskingRelay, PgServer, pg_bin

EMAIL = "alice.smith@example.com"
CARD = "4111 1111 1111 1111"
CARD_DIGITS = 4111111111111111

SETUP = f"""
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE users (
    id int PRIMARY KEY, email text UNIQUE, card text, secret text, note varchar(200),
    card_num bigint, doc jsonb, doc_json json, tags text[], ip inet, amount numeric(20,2),
    u uuid, m mood, nums int[]);
INSERT INTO users VALUES
 (1, '{EMAIL}', '{CARD}', 'the-launch-code', 'call me at {EMAIL} today', {CARD_DIGITS},
  '{{"contact": "{EMAIL}", "n": 1}}', '{{"contact": "{EMAIL}"}}',
  ARRAY['{EMAIL}', 'plain'], '10.1.2.3', 12.5,
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', ARRAY[1,2]),
 (2, 'bob@example.org', '5500 0000 0000 0004', 'other', 'nothing here', 7,
  '{{"n": 2}}', '{{"n": 2}}', ARRAY['x'], '192.168.0.1', 1.25, NULL, 'sad', NULL);
CREATE VIEW contacts AS SELECT id, secret AS code, note, card FROM users;
CREATE VIEW contacts2 AS SELECT * FROM contacts;
"""

RULES = rowmask.ColumnRules([rowmask.ColumnRule("users.secret", "redact"),
                             rowmask.ColumnRule("public.users.card", "partial"),
                             rowmask.ColumnRule("users.card_num", "partial")])


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    if not pg_bin("initdb"):
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs them)")
    s = PgServer().start()
    with psycopg.connect(s.dsn(), autocommit=True) as con:
        con.execute(SETUP)
    yield s
    s.stop()


def _make(rules: rowmask.ColumnRules = RULES) -> rowmask.ResultMasker:
    return rowmask.ResultMasker(rowmask.masker_for(MaskingConfig()), None, rules,
                                rowmask.Catalog())


@pytest.fixture()
def relay(pg: PgServer) -> Iterator[MaskingRelay]:
    r = MaskingRelay(pg, _make).start()
    yield r
    r.stop()
    assert not r.desyncs


def _no_raw(values: object) -> None:
    text = json.dumps(values, default=str)
    assert EMAIL not in text and "4111" not in text.replace("**** **** **** 1111", "") \
        and "the-launch-code" not in text


# ---------------------------------------------------------------- psycopg
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_rows_masked(relay: MaskingRelay, pg: PgServer, binary: bool) -> None:
    with psycopg.connect(pg.dsn(relay.port)) as con:
        cur = con.cursor(binary=binary)
        row = cur.execute("SELECT email, card, secret AS s, note, card_num, doc, doc_json, "
                          "tags, ip, amount, u, nums FROM users WHERE id = %s", [1]).fetchone()
        names = [d.name for d in cur.description]
    got = dict(zip(names, row, strict=True))
    _no_raw(got)
    assert got["email"] == "[EMAIL_1]"
    assert got["card"] == "**** **** **** 1111"           # rule, partial
    assert got["s"] == "[REDACTED_SECRET]"                # rule through an alias (catalog)
    assert got["note"] == "call me at [EMAIL_1] today"    # same placeholder in the connection
    assert got["card_num"] is None                        # rule on a bigint: NULL, not text
    assert got["doc"] == {"contact": "[EMAIL_1]", "n": 1}  # still JSON
    assert got["doc_json"] == {"contact": "[EMAIL_1]"}
    assert got["tags"] == ["[EMAIL_1]", "plain"]
    assert str(got["ip"]) == "10.1.2.3" or got["ip"] is None
    assert str(got["amount"]) == "12.50"
    assert str(got["u"]) == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert got["nums"] == [1, 2]
    done = [r for r in relay.results if r.tag == "SELECT 1"]
    assert done and done[-1].rows == 1 and done[-1].entities["EMAIL"]["count"] >= 4
    assert done[-1].findings >= 4


def test_detected_card_in_bigint_becomes_null(relay: MaskingRelay, pg: PgServer) -> None:
    with psycopg.connect(pg.dsn(relay.port)) as con:
        for binary in (False, True):
            row = con.cursor(binary=binary).execute(
                "SELECT card_num AS plain_number, 4111111111111111::numeric AS n2, "
                "'4111111111111111'::float8 AS f FROM users WHERE id = 1").fetchone()
            assert row == (None, None, None)


def test_pipeline_and_prepared_statements(relay: MaskingRelay, pg: PgServer) -> None:
    with psycopg.connect(pg.dsn(relay.port), prepare_threshold=0) as con:
        for _ in range(3):  # prepared on first use, then Bind/Execute without Describe
            row = con.execute("SELECT email, secret FROM users WHERE id = %s", [1]).fetchone()
            assert row == ("[EMAIL_1]", "[REDACTED_SECRET]")
        with con.pipeline():
            c1 = con.execute("SELECT email FROM users WHERE id = %s", [1])
            c2 = con.cursor(binary=True).execute("SELECT note FROM users WHERE id = %s", [1])
            c3 = con.execute("SELECT email FROM users ORDER BY id")
            con.execute("INSERT INTO users (id, email) VALUES (%s, %s)", [50, "p@example.net"])
        assert c1.fetchone() == ("[EMAIL_1]",)
        assert c2.fetchone() == ("call me at [EMAIL_1] today",)
        assert [r[0] for r in c3.fetchall()] == ["[EMAIL_1]", "[EMAIL_2]"]
        con.rollback()
    inserts = [r for r in relay.results if r.tag and r.tag.startswith("INSERT")]
    assert inserts and inserts[-1].rows == 0


async def _asyncpg(port: int, user: str) -> None:
    import asyncpg
    con = await asyncpg.connect(host="127.0.0.1", port=port, user=user, database="postgres")
    try:
        stmt = await con.prepare("SELECT email, card, secret, doc, tags, u, amount, ip "
                                 "FROM users WHERE id = $1")
        for _ in range(2):
            r = await stmt.fetchrow(1)
            assert r["email"] == "[EMAIL_1]" and r["card"] == "**** **** **** 1111"
            assert r["secret"] == "[REDACTED_SECRET]"
            assert json.loads(r["doc"]) == {"contact": "[EMAIL_1]", "n": 1}
            assert r["tags"] == ["[EMAIL_1]", "plain"]
            assert str(r["u"]) == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
            assert str(r["amount"]) == "12.50"
        rows = await con.fetch("SELECT id, email FROM users ORDER BY id")
        assert [r["email"] for r in rows] == ["[EMAIL_1]", "[EMAIL_2]"]
        # an enum is a user-defined type: its binary form cannot be inspected -> refused,
        # and the connection goes on
        with pytest.raises(asyncpg.PostgresError) as e:
            await con.fetch("SELECT m, email FROM users")
        assert "result refused" in str(e.value)
        assert await con.fetchval("SELECT 1 + 1") == 2
    finally:
        await con.close()


def test_asyncpg_binary_prepared(relay: MaskingRelay, pg: PgServer) -> None:
    asyncio.run(_asyncpg(relay.port, pg.user))
    assert any(r.refused for r in relay.results)


def test_binary_user_type_refused_session_usable(relay: MaskingRelay, pg: PgServer) -> None:
    with psycopg.connect(pg.dsn(relay.port), autocommit=True) as con:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="result refused"):
            con.cursor(binary=True).execute("SELECT m FROM users").fetchall()
        # the same in text format is fine (and text of a user type is inspected)
        assert con.execute("SELECT m::text FROM users ORDER BY id").fetchall() == \
            [("happy",), ("sad",)]
        assert con.cursor(binary=True).execute("SELECT email FROM users WHERE id = 2"
                                               ).fetchone() == ("[EMAIL_1]",)


def test_errors_and_notices_masked(relay: MaskingRelay, pg: PgServer) -> None:
    notices: list[str] = []
    with psycopg.connect(pg.dsn(relay.port), autocommit=True) as con:
        con.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        with pytest.raises(psycopg.errors.UniqueViolation) as e:
            con.execute("INSERT INTO users (id, email) VALUES (99, %s)", [EMAIL])
        assert EMAIL not in str(e.value.diag.message_detail)
        assert "[EMAIL_" in str(e.value.diag.message_detail)
        con.execute(f"DO $$ BEGIN RAISE NOTICE 'mail %', '{EMAIL}'; END $$")
        assert notices and EMAIL not in notices[0] and "[EMAIL_" in notices[0]
        assert con.execute("SELECT 1").fetchone() == (1,)
    errs = [r for r in relay.results if r.error]
    assert errs and errs[0].error.startswith("23505") and EMAIL not in errs[0].error


@pytest.mark.skipif(not pg_bin("psql"), reason="psql not installed")
def test_psql_simple_protocol_and_copy(relay: MaskingRelay, pg: PgServer) -> None:
    out = subprocess.run(
        [pg_bin("psql") or "psql", pg.dsn(relay.port), "-At", "-c",
         "SELECT email, secret, note FROM users ORDER BY id", "-c",
         "SELECT 1; SELECT email FROM users WHERE id = 2"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert EMAIL not in out.stdout and "the-launch-code" not in out.stdout
    assert "[EMAIL_1]|[REDACTED_SECRET]|call me at [EMAIL_1] today" in out.stdout
    # COPY TO STDOUT carries no column identity: refused while column rules apply
    out = subprocess.run([pg_bin("psql") or "psql", pg.dsn(relay.port), "-At", "-c",
                          "COPY users (email) TO STDOUT", "-c", "SELECT 42"],
                         capture_output=True, text=True, timeout=30)
    assert EMAIL not in out.stdout + out.stderr and "result refused" in out.stderr
    assert "42" in out.stdout


def test_copy_masked_without_rules(pg: PgServer) -> None:
    r = MaskingRelay(pg, lambda: _make(rowmask.ColumnRules())).start()
    try:
        with psycopg.connect(pg.dsn(r.port)) as con, con.cursor() as cur:
            with cur.copy("COPY (SELECT email, note FROM users ORDER BY id) TO STDOUT") as cp:
                data = b"".join(bytes(b) for b in cp)
        assert EMAIL.encode() not in data and b"[EMAIL_1]\tcall me at [EMAIL_1] today" in data
    finally:
        r.stop()


def test_column_rules_without_catalog_match_field_names() -> None:
    rules = rowmask.ColumnRules([rowmask.ColumnRule("users.secret", "redact")])
    assert rules.match("public", "users", "secret") == "redact"
    assert rules.match("public", "orders", "secret") is None
    assert rules.match(None, None, "SECRET") == "redact"  # computed/unnamed: column decides
    with pytest.raises(ValueError, match="unknown column masking strategy"):
        rowmask.ColumnRules([rowmask.ColumnRule("a.b", "scramble")])


def test_desync_on_unsolicited_rows() -> None:
    m = _make()
    with pytest.raises(rowmask.Desync):
        m.server(b"D", b"\x00\x00")
    with pytest.raises(rowmask.Desync):
        m.client(b"B", b"\x00")  # truncated Bind


# ---------------------------------------------------------------- protocol edge cases
def _parse(sql: bytes, name: bytes = b"") -> bytes:
    return name + b"\0" + sql + b"\0" + struct.pack(">h", 0)


def _bind(fmts: tuple[int, ...] = (), portal: bytes = b"", stmt: bytes = b"") -> bytes:
    return (portal + b"\0" + stmt + b"\0" + struct.pack(">hh", 0, 0)
            + struct.pack(">h", len(fmts)) + b"".join(struct.pack(">h", f) for f in fmts))


def _execute(portal: bytes = b"") -> bytes:
    return portal + b"\0" + struct.pack(">i", 0)


def _rd(type_oid: int, fmt: int = 0) -> bytes:
    return rowmask.build_row_description([rowmask.Field(b"c", 0, 0, type_oid, -1, -1, fmt)])


def _error(code: bytes, text: bytes) -> bytes:
    return rowmask.build_fields([(ord("S"), b"ERROR"), (ord("C"), code), (ord("M"), text)])


def _simple_query_masks(m: rowmask.ResultMasker) -> None:
    m.client(b"Q", b"SELECT c\0", "q")
    assert m.server(b"T", _rd(25)) == [(b"T", _rd(25))]
    out = m.server(b"D", rowmask.build_data_row([EMAIL.encode()]))
    assert rowmask.parse_data_row(out[0][1]) == [b"[EMAIL_1]"]
    m.server(b"C", b"SELECT 1\0")
    assert m.server(b"Z", b"I") == [(b"Z", b"I")]


def test_server_error_then_messages_sent_before_sync() -> None:
    """After an error the server skips everything up to Sync, also what the client sent
    after it (it had not read the error yet): the masker must not expect answers for them."""
    m = _make()
    m.client(b"P", _parse(b"SELECT 1/0"))
    m.client(b"B", _bind())
    m.client(b"E", _execute(), "e1")
    assert m.server(b"1", b"") == [(b"1", b"")]
    assert m.server(b"2", b"") == [(b"2", b"")]
    out = m.server(b"E", _error(b"22012", f"division by zero near {EMAIL}".encode()))
    assert EMAIL.encode() not in out[0][1]
    for t, p in ((b"P", _parse(b"SELECT 2")), (b"B", _bind()), (b"E", _execute()),
                 (b"S", b"")):
        m.client(t, p, None)
    assert m.server(b"Z", b"I") == [(b"Z", b"I")]
    _simple_query_masks(m)
    assert [r.error for r in m.results if r.token == "e1"] == ["22012: division by zero "
                                                               "near [EMAIL_1]"]


def test_refused_result_drops_the_rest_of_the_unit() -> None:
    m = _make()
    m.client(b"P", _parse(b"SELECT m FROM t"))
    m.client(b"B", _bind((1,)))
    m.client(b"D", b"P\0")
    m.client(b"E", _execute(), "e1")
    m.server(b"1", b"")
    m.server(b"2", b"")
    out = m.server(b"T", _rd(70000, 1))  # a user-defined type in binary: cannot inspect
    assert out[0][0] == b"E" and b"0A000" in out[0][1] and b"result refused" in out[0][1]
    assert m.server(b"D", rowmask.build_data_row([b"secret"])) == []
    assert m.server(b"C", b"SELECT 1\0") == []
    m.client(b"S", b"")  # the Sync came after the rows
    assert m.server(b"Z", b"I") == [(b"Z", b"I")]
    assert [r.refused for r in m.results] == [True]
    _simple_query_masks(m)


def test_rows_of_a_statement_never_described_are_refused() -> None:
    m = _make()
    m.client(b"P", _parse(b"SELECT email FROM users", b"s1"))
    m.client(b"S", b"")
    m.server(b"1", b"")
    m.server(b"Z", b"I")
    m.client(b"B", _bind((0,), stmt=b"s1"))
    m.client(b"E", _execute(), "e")
    m.client(b"S", b"")
    m.server(b"2", b"")
    out = m.server(b"D", rowmask.build_data_row([EMAIL.encode()]))
    assert out[0][0] == b"E" and b"never described" in out[0][1]
    assert m.server(b"C", b"SELECT 1\0") == []
    assert m.server(b"Z", b"I") == [(b"Z", b"I")]
    _simple_query_masks(m)


def test_placeholders_shared_with_the_llm_session_and_never_restorable() -> None:
    """With masking's map of the same identity + session, a value in a result gets the
    placeholder it has in the agent's LLM traffic, a new one gets a new number (never a
    number already taken by another person), and result values never become restorable."""
    from types import SimpleNamespace

    from addons.frame.principal import principal
    from addons.masking.bodies import Masked
    from addons.masking.masker import SessionStore, session_key
    cfg = MaskingConfig()
    masker = rowmask.masker_for(cfg)
    assert masker is not None
    sessions = SessionStore()
    llm_side = sessions.get(session_key(principal({"sub": "agent-7"}), "t1"))
    assert Masked(masker, llm_side, {}).text("mail alice@x.example") == "mail [EMAIL_1]"
    m = rowmask.make_result_masker(SimpleNamespace(name="w", database="d", mask=True,
                                                   mask_columns=()), cfg, {"sub": "agent-7"},
                                   masker=masker, sessions=sessions, session="t1")
    m.client(b"Q", b"SELECT c\0", "q")
    m.server(b"T", _rd(25))
    got = [rowmask.parse_data_row(m.server(b"D", rowmask.build_data_row([v]))[0][1])[0]
           for v in (b"bob@y.example", b"alice@x.example")]
    assert got == [b"[EMAIL_2]", b"[EMAIL_1]"]
    assert llm_side.original("[EMAIL_2]") is None  # bob's address never comes back
    assert llm_side.original("[EMAIL_1]") == "alice@x.example"  # the agent's own, as before
    other = rowmask.make_result_masker(SimpleNamespace(name="w", database="d", mask=True,
                                                       mask_columns=()), cfg, {"sub": "x"},
                                       masker=masker, sessions=sessions, session="t1")
    other.client(b"Q", b"SELECT c\0", "q")
    other.server(b"T", _rd(25))
    out = other.server(b"D", rowmask.build_data_row([b"bob@y.example"]))
    assert rowmask.parse_data_row(out[0][1]) == [b"[EMAIL_1]"]  # another identity's map


def test_views_are_read_as_their_base_tables(relay: MaskingRelay, pg: PgServer) -> None:
    """A view (even of a view) does not hide a ruled column: a column keeping its name gets
    its rule, a renamed text column the base table's strictest rule; numbers stay."""
    with psycopg.connect(pg.dsn(relay.port)) as con:
        row = con.execute("SELECT code, card, note, id FROM contacts2 WHERE id = 1").fetchone()
    assert row == ("[REDACTED_CODE]", "**** **** **** 1111", "[REDACTED_NOTE]", 1)

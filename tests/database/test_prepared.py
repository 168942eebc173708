"""The relay's view of the server's prepared statements (session.Prepared): a definition
counts once the server acknowledged it; skipped or refused ones vanish at ReadyForQuery."""

from __future__ import annotations

from addons.database.policy import Verdict
from addons.database.session import Prepared
from addons.database.sqlfacts import analyze

SELECT = (analyze("SELECT 1"), Verdict("allow", None))
DELETE = (analyze("DELETE FROM t WHERE id = $1"), Verdict("approve", "r"))


def test_parse_acknowledged_then_closed() -> None:
    p = Prepared()
    p.op("parse", "s", DELETE)
    assert p.view("s") == (DELETE, 0)      # pending, in the current pipeline
    p.sent += 1                            # Sync
    p.server(b"1", b"")
    assert p.view("s") == (DELETE, None)
    p.server(b"Z", b"I")
    p.op("close_s", "s")
    p.sent += 1
    p.server(b"3", b"")
    p.server(b"Z", b"I")
    assert p.view("s") == (None, None)


def test_skipped_parse_is_forgotten_at_ready_for_query() -> None:
    """An error earlier in the pipeline makes the server skip the Parse: a later pipeline
    must not judge a Bind of that name by the skipped SQL."""
    p = Prepared()
    p.op("parse", "s", SELECT)
    p.sent += 1
    p.server(b"E", b"")                    # some earlier message failed
    assert p.view("s") == (SELECT, 0)      # still pending: the relay waits for the Z
    p.server(b"Z", b"I")
    assert p.view("s") == (None, None)


def test_sql_prepare_and_deallocate_need_their_command_tags() -> None:
    p = Prepared()
    p.op("prepare", "x", DELETE)
    p.sent += 1
    p.server(b"C", b"PREPARE\0")
    p.server(b"Z", b"I")
    assert p.view("x") == (DELETE, None)
    p.op("deallocate", "x")
    p.sent += 1
    p.server(b"E", b"")                    # DEALLOCATE refused (aborted transaction)
    p.server(b"Z", b"E")
    assert p.view("x") == (DELETE, None)   # still there on the server
    p.op("deallocate", "*")
    p.sent += 1
    p.server(b"C", b"DISCARD ALL\0")
    p.server(b"Z", b"I")
    assert p.view("x") == (None, None)


def test_failed_unnamed_parse_leaves_no_unnamed_statement() -> None:
    p = Prepared()
    p.op("parse", "", SELECT)
    p.sent += 1
    p.server(b"1", b"")
    p.server(b"Z", b"I")
    p.op("parse", "", DELETE)
    p.sent += 1
    p.server(b"E", b"")
    p.server(b"Z", b"I")
    assert p.view("") == (None, None)

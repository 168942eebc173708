"""The relay renews a connection's placeholder map from the masking addon's store before each
statement: once the store dropped an idle session and the LLM traffic numbers values in a new
map, a result masked by the old map would hand out a number that now means another value."""

from __future__ import annotations

from types import SimpleNamespace

from addons.database import rowmask
from addons.database.session import Session
from addons.frame.principal import principal
from addons.masking.config import MaskingConfig
from addons.masking.masker import SessionStore, session_key


def _masked_email(m: rowmask.ResultMasker, value: str) -> str:
    m.client(b"Q", b"SELECT 1\0", None)
    m.server(b"T", rowmask.build_row_description([rowmask.Field(b"a", 0, 0, 25, -1, -1, 0)]))
    out = m.server(b"D", rowmask.build_data_row([value.encode()]))
    m.server(b"C", b"SELECT 1\0")
    m.server(b"Z", b"I")
    m.results.clear()
    v = rowmask.parse_data_row(out[0][1])[0]
    assert v is not None
    return v.decode()


def test_a_session_the_store_dropped_is_renewed_before_the_next_statement() -> None:
    now = [0.0]
    store = SessionStore(idle_ttl=10, clock=lambda: now[0])
    db = SimpleNamespace(name="warehouse", database="analytics", mask=True, mask_columns=())
    masking = MaskingConfig()
    masker = rowmask.make_result_masker(db, masking, {"sub": "agent-7"},
                                        masker=rowmask.masker_for(masking), sessions=store,
                                        session="t1")
    relay = Session(SimpleNamespace(db=db), SimpleNamespace(),
                    SimpleNamespace(get_extra_info=lambda _k: ("127.0.0.1", 1)))
    relay.identity, relay.session_id = {"sub": "agent-7"}, "t1"
    relay.masker, relay.placeholder_store = masker, store
    key = session_key(principal({"sub": "agent-7"}), "t1")
    assert masker.session is store.get(key)

    now[0] = 60  # idle past the TTL: the LLM side now numbers in a new map
    llm = store.get(key)
    assert llm.placeholder("EMAIL", "ann.lee@example.com", True) == "[EMAIL_1]"
    relay._renew_placeholders()  # what the relay does before each statement
    assert masker.session is llm
    assert _masked_email(masker, "zed.q@example.net") == "[EMAIL_2]"
    assert _masked_email(masker, "ann.lee@example.com") == "[EMAIL_1]"

    relay.session_id = "t2"  # another session never gets this map
    relay._renew_placeholders()
    assert masker.session is not llm
    assert _masked_email(masker, "zed.q@example.net") == "[EMAIL_1]"

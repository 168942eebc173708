"""Body-named sessions read through the one decoder: a UTF-16 or BOM body names its session
exactly as policy and masking read it (the cheap byte pre-check is UTF-8 only)."""

from __future__ import annotations

import codecs
import json

from mitmproxy.test import taddons, tflow

from addons.config.holder import RulesHolder
from addons.recording.sessions import Sessions


def _flow(body: bytes):
    f = tflow.tflow()
    f.request.headers["content-type"] = "application/json"
    f.request.raw_content = body
    f.metadata["session"] = f"conn-{f.client_conn.id}"
    f.metadata["recorder"] = {"session_source": "connection"}
    return f


def test_utf16_and_bom_bodies_name_their_session() -> None:
    text = json.dumps({"metadata": {"thread_id": "t-9"}})
    s = Sessions(RulesHolder())
    with taddons.context():
        for raw in (codecs.BOM_UTF16_LE + text.encode("utf-16-le"), text.encode("utf-16-be"),
                    codecs.BOM_UTF8 + text.encode(), text.encode("utf-32-le")):
            f = _flow(raw)
            s.request(f)
            assert f.metadata["session"] == "t-9", raw[:8]


def test_every_configured_key_is_looked_for_whatever_its_first_segment() -> None:
    """The byte pre-check scans the body once per distinct first segment of the keys
    (the defaults share `metadata`): a key with another first segment, listed after keys
    that share one, still names the session; a body naming none of them keeps the
    connection's session. Fails if the pre-check checks only the first key's segment, or
    caches the segments of another key set."""
    from types import SimpleNamespace

    from addons.recording.config import RecorderConfig

    def sessions(keys: tuple[str, ...]) -> Sessions:
        return Sessions(RulesHolder(SimpleNamespace(  # type: ignore[arg-type]
            recorder=RecorderConfig(session_body_keys=keys))))

    shared = sessions(("metadata.thread_id", "metadata.run_id", "ctx.session", "run"))
    other = sessions(("conversation.id",))
    with taddons.context():
        for body, want in ((b'{"ctx": {"session": "c-1"}}', "c-1"),
                           (b'{"run": "r-2", "metadata": {}}', "r-2"),
                           (b'{"metadata": {"run_id": "m-3"}}', "m-3"),
                           (b'{"conversation": {"id": "x"}}', None)):
            f = _flow(body)
            shared.request(f)
            assert f.metadata["session"] == (want or f"conn-{f.client_conn.id}"), body
        f = _flow(b'{"conversation": {"id": "v-4"}}')
        other.request(f)
        assert f.metadata["session"] == "v-4"
        g = _flow(b'{"ctx": {"session": "c-1"}}')
        other.request(g)
        assert g.metadata["session"] == f"conn-{g.client_conn.id}"


def test_a_compressed_body_is_decoded_even_without_a_nul_up_front() -> None:
    """The pre-check reads the Content-Encoding (one pass with Content-Type): a deflate
    body (no NUL in its first bytes, its words compressed away) is decoded and names its
    session; read as uncompressed, the scan would find no key and skip it."""
    import zlib

    raw = zlib.compress(json.dumps({"metadata": {"thread_id": "z-1"}, "pad": "m" * 50})
                        .encode())
    assert b"\0" not in raw[:4] and b"metadata" not in raw
    s = Sessions(RulesHolder())
    with taddons.context():
        f = _flow(raw)
        f.request.headers["content-encoding"] = "deflate"
        s.request(f)
        assert f.metadata["session"] == "z-1"

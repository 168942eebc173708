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

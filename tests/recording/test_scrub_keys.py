"""A real secret in the flow's metadata never reaches the stored row, whichever
characters JSON escapes it holds (quote, backslash, a control character, non-ASCII, '/'),
on the writer's fast path (store._scrub_metadata: orjson's text searched for each secret's
escaped form, the walk only when one is there) — as a value, which held, and as a key of
the metadata, which did not: Scrubber.walk scrubbed values only, so the `metadata` column
kept the key whole (the state blob's JSON text was redacted, keys and all)."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tflow

from addons.recording import store
from addons.recording.addon import build

SECRETS = ["sk-real\"quote\\back-0000000000", "sk-real\x1bcontrol-0000000000",
           "sk-réal-ünïcode-000000000000", "sk-real/slash-00000000000000"]


def _row(secret: str, as_key: bool) -> dict:
    f = tflow.tflow(resp=True)
    f.metadata["note"] = f"upstream said {secret} twice: {secret}"
    f.metadata["agentgate_extra"] = {secret: [secret, 1, None]} if as_key else [secret]
    return build(store.Pending(state=f.get_state(), session="s", secrets=(secret,)))


@pytest.mark.parametrize("as_key", [False, True])
@pytest.mark.parametrize("secret", SECRETS)
def test_a_secret_that_json_escapes_never_reaches_the_stored_row(secret: str,
                                                                as_key: bool) -> None:
    row = _row(secret, as_key)
    assert "[REDACTED]" in row["metadata"]
    texts = [v for v in row.values() if isinstance(v, str)]
    blobs = [b[1] for b in row.get("_blobs") or ()]
    state = row.get("flow_state") or b""
    escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
    for t in texts:
        assert secret not in t and escaped not in t
    for b in [*blobs, state]:
        assert escaped.encode("utf-8") not in b and secret.encode() not in b
    # what the store gives back of it: the state as exported, the metadata column parsed
    meta = json.loads(row["metadata"])
    assert secret not in json.dumps(meta, ensure_ascii=False)

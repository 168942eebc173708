"""A hostile upstream streams one large SSE event full of e-mail addresses: masking it must
not hold the event loop (every other flow of the gateway). Through a real mitmdump: while
the big event is masked (in a worker thread, the stream's layer paused), another agent's
small request goes through and completes — before the streaming agent gets the masked
event. Before, the event was masked inside mitmproxy's stream callback, on the loop: the
other request could only be served after it, so it completed after the event arrived.

The stream itself is unchanged: events in order, every address masked, [DONE] last."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Gateway
from tests.hostile.edgekit import AGENT_KEY, CHAT, ChunkedHandler, client, serve_tls
from tests.hostile.test_fastpaths_streams import Upstream as _StreamingUpstream
from tests.hostile.test_fastpaths_streams import gw  # noqa: F401 - fixture (see below)

pytestmark = pytest.mark.integration

N_ADDRESSES = 60_000  # ~1.5 MB in one event: ~0.4 s to mask here (idle), more under load
BIG = " ".join(f"user{i}.x@example.com" for i in range(N_ADDRESSES))


def _event(text: str) -> bytes:
    return ("data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m",
                                   "choices": [{"index": 0, "delta": {"content": text},
                                                "finish_reason": None}]}) + "\n\n").encode()


class Upstream(_StreamingUpstream):
    """Streams: a small first event, then the big one (one write), then waits for the
    test to say so before [DONE] (the stream stays open meanwhile)."""

    def __init__(self, standin) -> None:
        self.big_sent = threading.Event()
        self.finish = threading.Event()
        up = self

        class H(ChunkedHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                self._chunk(_event("hello "))
                self._chunk(_event(BIG))
                up.big_sent.set()
                up.finish.wait(30)
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.server, self.url = serve_tls(H, standin)

    def stop(self) -> None:
        self.finish.set()
        super().stop()


# `gw` (imported): the gateway with llm.example.com forwarded to this module's `upstream`
@pytest.fixture
def upstream(standin) -> Iterator[Upstream]:
    u = Upstream(standin)
    yield u
    u.stop()


def test_a_big_event_is_masked_while_other_flows_are_served(gw: Gateway,  # noqa: F811
                                                           upstream: Upstream) -> None:
    got = bytearray()
    times: dict[str, float] = {}
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            with client(gw) as c, c.stream(
                    "POST", "https://llm.example.com/v1/chat/completions",
                    content=json.dumps({"model": "m", "stream": True, "messages": [
                        {"role": "user", "content": "hi"}]}).encode(),
                    headers={"content-type": "application/json",
                             "authorization": f"Bearer {AGENT_KEY}"}) as r:
                assert r.status_code == 200
                for part in r.iter_raw():
                    got.extend(part)
                    if "big" not in times and b"[EMAIL" in got:
                        times["big"] = time.monotonic()
                        upstream.finish.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert upstream.big_sent.wait(30)
    time.sleep(0.05)  # the gateway is reading (and masking) the big event
    with client(gw) as c:
        r = c.post("https://api.openai.com/v1/chat/completions", content=CHAT,
                   headers={"content-type": "application/json",
                            "authorization": f"Bearer {AGENT_KEY}"})
    times["other"] = time.monotonic()
    assert r.status_code == 200, r.text
    t.join(60)
    assert not errors, errors
    assert "big" in times, got[:300]
    # served while the big event was being masked, not after it
    assert times["other"] < times["big"], times["big"] - times["other"]

    text = got.decode()
    events = [e for e in text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    contents = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]]
    joined = "".join(contents)
    assert joined.startswith("hello ")
    assert "@example.com" not in joined
    assert joined.count("[EMAIL") == N_ADDRESSES

"""mcp/sse.Splitter keeps a line that arrives in pieces as pieces (no copy and rescan of
the whole line per chunk): the same events whatever the cut, the same bound."""

from __future__ import annotations

import random

import pytest

from addons.mcp.sse import EventTooLarge, Splitter

PIECES = [b"a", b"bc", b"\n", b"\r", b"\r\n", b":", b" ", b"\xef\xbb\xbf", b"data", b"x" * 50]


def _events(stream: bytes, cuts: list[int], max_event: int = 1 << 20) -> list[list[bytes]]:
    sp = Splitter(max_event)
    out: list[list[bytes]] = []
    pos = 0
    for n in cuts:
        out += sp.feed(stream[pos:pos + n])
        pos += n
    out += sp.feed(stream[pos:])
    return out + sp.end()


@pytest.mark.parametrize("seed", range(20))
def test_any_cut_gives_the_events_of_the_whole(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(200):
        stream = b"".join(rnd.choice(PIECES) for _ in range(rnd.randint(0, 80)))
        whole = _events(stream, [])
        cuts = [rnd.randint(1, 9) for _ in range(len(stream))]
        assert _events(stream, cuts) == whole, stream


def test_a_line_in_pieces_is_bounded() -> None:
    sp = Splitter(1000)
    sp.feed(b"data: ")
    with pytest.raises(EventTooLarge):
        for _ in range(200):
            sp.feed(b"x" * 10)


def test_a_long_line_in_pieces_is_one_line() -> None:
    sp = Splitter(1 << 20)
    parts = [b"data: ", *[b"y" * 1000] * 100, b"\r", b"\n", b"\n"]
    out = [ev for p in parts for ev in sp.feed(p)]
    assert out == [[b"data: " + b"y" * 100_000]]
    assert not sp.pending()

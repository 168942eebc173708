"""Hostile: egress's remembered path verdicts (Upstreams.requestheaders: normalise + the
dialect's globs, kept in a bounded LRU keyed by dialect, the upstream's `paths:` and the
path with its query and fragment cut off), through a real mitmdump. A verdict remembered
under one set of rules must not answer for another: a reload that restricts a webhook's
`paths:` refuses a path allowed (and remembered) a moment before, a reload that moves the
allowance lets the other one through; a query or fragment never turns a refused path into
an allowed one (nor the reverse), a percent-encoded spelling gets the verdict of what it
decodes to, a spelling in another case is another path, and an ambiguous path stays
refused whatever was remembered for its plain form. Nothing refused reaches the upstream."""

from __future__ import annotations

import time

import pytest

from tests.conftest import Gateway
from tests.hostile.edgekit import assert_healthy, http_req, status_of, tls_request

pytestmark = pytest.mark.integration

HOST = "hooks.example.com"


def send(gw: Gateway, path: str) -> int:
    answer = tls_request(gw, f"{HOST}:443", http_req("POST", path, HOST, b'{"x": 1}'),
                         sni=HOST)
    status = status_of(answer)
    if status == 404:
        assert "path_not_allowed" in answer.split(b"\r\n\r\n", 1)[1].decode(), answer[:300]
    return status


def set_paths(gw: Gateway, paths: str | None) -> None:
    """The (HTTPS) webhook upstream's `paths:` set to `paths` (None: no line), reloaded."""
    f = gw.rules_dir / "rules.yaml"
    lines = [ln for ln in f.read_text().splitlines(keepends=True)
             if not ln.lstrip().startswith("paths:")]
    text = "".join(lines)
    if paths is not None:
        text = text.replace("dialect: webhook\n", f"dialect: webhook\n    paths: {paths}\n", 1)
    before = gw.logs().count("rules reloaded")
    f.write_text(text)
    deadline = time.monotonic() + 30
    while gw.logs().count("rules reloaded") <= before:
        assert time.monotonic() < deadline, gw.logs()[-2000:]
        time.sleep(0.1)


def forwarded(standin) -> list[str]:
    return [r["path"] for r in standin.requests]


def test_remembered_path_verdicts_follow_the_rules_in_force(gateway_factory, no_identity,
                                                            standin) -> None:
    gw = gateway_factory({"rules.yaml": "{standin_upstreams}" + no_identity})
    assert "    dialect: webhook\n" in (gw.rules_dir / "rules.yaml").read_text()
    standin.clear()
    # no paths: any path of a webhook; these verdicts are now remembered
    assert send(gw, "/b/x") == 200 and send(gw, "/a/x") == 200
    set_paths(gw, "['/a/**']")
    standin.clear()
    assert send(gw, "/b/x") == 404  # allowed and remembered a moment ago
    assert send(gw, "/b/x?to=/a/x") == 404 and send(gw, "/b/x#/a/x") == 404
    assert send(gw, "/a/x") == 200
    assert send(gw, "/a/x?next=/b/x") == 200
    assert send(gw, "/%61/x") == 200  # decodes to /a/x
    assert send(gw, "/A/x") == 404  # another path
    assert send(gw, "/a/x/../../b/x") == 400  # ambiguous whatever /a/x's verdict is
    assert send(gw, "/a/%2e%2e/b/x") == 400
    assert all(p.split("?")[0] in ("/a/x", "/%61/x") for p in forwarded(standin)), \
        forwarded(standin)
    set_paths(gw, "['/b/**']")
    standin.clear()
    assert send(gw, "/a/x") == 404 and send(gw, "/%61/x") == 404
    assert send(gw, "/b/x") == 200
    assert forwarded(standin) == ["/b/x"]
    set_paths(gw, None)
    assert send(gw, "/A/x") == 200  # every path again
    assert_healthy(gw, standin)


def test_the_query_is_not_what_the_verdict_remembers(gateway_factory, no_identity,
                                                     standin) -> None:
    """The same path with fifty distinct queries: each gets the path's verdict, each
    allowed one is forwarded with its own query."""
    rules = "{standin_upstreams}" + no_identity
    gw = gateway_factory({"rules.yaml": rules})
    set_paths(gw, "['/a/**']")
    standin.clear()
    for i in range(50):
        assert send(gw, f"/a/x?q=query-value-{i:04d}") == 200
        assert send(gw, f"/b/x?q=query-value-{i:04d}") == 404
    assert forwarded(standin) == [f"/a/x?q=query-value-{i:04d}" for i in range(50)]
    assert_healthy(gw, standin)

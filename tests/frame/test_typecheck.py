"""addons/frame/typecheck.py: mitmproxy's message type check, the same verdicts cheaper.

Differential: every field of mitmproxy's Request and Response data classes is given values
of the right type, of a subclass, of the widened int for a float, and of wrong types; the
replacement must accept what mitmproxy's own `__post_init__` accepts and raise the very
TypeError (text included) it raises. Annotations that are not plain classes go to
mitmproxy's own check."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from addons.frame import typecheck


@pytest.fixture(autouse=True)
def restore(monkeypatch):
    monkeypatch.setattr(http.MessageData, "__post_init__", http.MessageData.__post_init__)


class Bytes(bytes):
    pass


# one value per kind; each field gets every one of them
VALUES = [b"x", Bytes(b"y"), "s", 1, True, 1.5, None, http.Headers(), [b"x"], object()]


def verdict(fn, data) -> str:
    try:
        fn(data)
    except TypeError as e:
        return f"TypeError: {e}"
    return "ok"


@pytest.mark.parametrize("make", [tutils.treq, tutils.tresp], ids=["request", "response"])
def test_same_verdict_for_every_field_and_value(make):
    data = make().data
    fields = [f.name for f in dataclasses.fields(data)]
    assert typecheck.plan_for(type(data)) is not None  # the fast path is what is tested
    rejected = 0
    for name in fields:
        for value in VALUES:
            d = dataclasses.replace(data)  # a valid copy (its own check passes)
            object.__setattr__(d, name, value)
            want = verdict(typecheck.ORIGINAL, d)
            assert verdict(typecheck.post_init, d) == want, (name, value)
            rejected += want != "ok"
    assert rejected > len(fields) * 5  # the wrong types were there, and refused


def test_installed_check_runs_on_construction():
    assert typecheck.install()
    assert http.MessageData.__post_init__ is typecheck.post_init
    tutils.treq()  # valid messages still build
    good = dataclasses.asdict(tutils.treq().data, dict_factory=dict)
    good["headers"] = http.Headers()
    with pytest.raises(TypeError, match="Expected <class 'bytes'> for method"):
        http.RequestData(**{**good, "method": "GET"})
    with pytest.raises(TypeError, match="for timestamp_end"):
        http.Response(b"HTTP/1.1", 200, b"OK", http.Headers(), b"", None, 0.0, "late")
    # an int where a float is declared is fine, as mitmproxy has it
    http.Response(b"HTTP/1.1", 200, b"OK", http.Headers(), b"", None, 0, 1)


# real annotation objects (this module's own are strings: `from __future__ import annotations`)
Odd = dataclasses.make_dataclass("Odd", [("anything", typing.Any, None),
                                         ("names", typing.Sequence[str], ())],
                                 bases=(http.MessageData,))
Later = dataclasses.make_dataclass("Later", [("later", "int", 0)], bases=(http.MessageData,))
AnyOnly = dataclasses.make_dataclass("AnyOnly", [("x", typing.Any, 0)],
                                     bases=(http.MessageData,))


def test_other_annotations_are_left_to_mitmproxy():
    for cls in (Odd, Later, AnyOnly):
        assert typecheck.plan_for(cls) is None, cls
    typecheck.install()
    d = tutils.treq().data
    base = dict(http_version=d.http_version, headers=d.headers, content=d.content,
                trailers=None, timestamp_start=0.0, timestamp_end=None)
    for kw in ({}, {"names": ["a"]}, {"names": [1]}, {"names": "ab"}, {"anything": object()}):
        try:
            typecheck.ORIGINAL(Odd(**base, **kw))
            want = "ok"
        except TypeError as e:
            want = str(e)
        try:
            Odd(**base, **kw)  # through the installed replacement
            got = "ok"
        except TypeError as e:
            got = str(e)
        assert got == want, kw


def test_pins_hold_and_install_is_idempotent():
    assert typecheck.check_pins() == []
    assert typecheck.install() and typecheck.install()
    assert typecheck.post_init.agentgate_original is typecheck.ORIGINAL
    assert typecheck.ORIGINAL is not typecheck.post_init

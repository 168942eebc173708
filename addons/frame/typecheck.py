"""mitmproxy's type check of every HTTP message it builds, the same answer cheaper.

mitmproxy 12.2 checks the field types of every `Request` and `Response` it constructs
(`MessageData.__post_init__`, under `__debug__`): per field `dataclasses.fields()`, then
`typecheck.check_option_type`, which builds a TypeError (an f-string of the type) *before*
it looks at the value, and recurses into each arm of a `X | None`. Three messages per
flow (the request, `expected_http_body_size`'s scratch request, the response): ~0.06-0.09
ms of CPU per request at 1 KB, in bare mitmdump as in the gateway.

Here the check is one `isinstance` per field against the types the annotation allows,
worked out once per message class. It is exact by construction:
- a value it accepts is one `check_option_type` accepts: the allowed types are the
  annotation's arms (a plain class, or each class of a `A | B` / `Optional`), plus `int`
  where an arm is `float` (check_option_type's one widening), and both are `isinstance`;
- a value it does not accept is handed to `check_option_type` itself, which raises its own
  TypeError (same text) — or accepts it, and then so does this;
- a class whose annotations are anything else (`Any`, a parametrised or IO type, a string)
  is checked by mitmproxy's own `__post_init__`, field by field as before.
The install is version-pinned and checks the source of what it replaces; anything
unexpected (or `python -O`, where mitmproxy has no check) leaves mitmproxy's own in place.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
import typing
from typing import Any

from mitmproxy import http
from mitmproxy import version as mitmproxy_version
from mitmproxy.utils import typecheck as _typecheck

log = logging.getLogger("agentgate.typecheck")

PINNED_MITMPROXY = "12.2."
_FRAGMENTS = ("for field in fields(self):", "val = getattr(self, field.name)",
              "typecheck.check_option_type(field.name, val, field.type)")
_OURS = "agentgate_typecheck"
_found = http.MessageData.__dict__.get("__post_init__")
# mitmproxy's own, also when this module is imported again over an installed replacement
ORIGINAL = getattr(_found, "agentgate_original", _found)
_UNIONS = (typing.Union, types.UnionType)
_NOT_PLAIN = (typing.Any, typing.IO, typing.TextIO, typing.BinaryIO)

# per message class: ((field name, allowed classes, annotation), ...), or None when the
# class's annotations are not all plain classes (mitmproxy's own check then)
Plan = tuple[tuple[str, tuple[type, ...], Any], ...]
_PLANS: dict[type, Plan | None] = {}


def plan_for(cls: type) -> Plan | None:
    """The fields of `cls` with the classes `check_option_type` accepts for each."""
    out = []
    for f in dataclasses.fields(cls):
        t = f.type
        arms = typing.get_args(t) if typing.get_origin(t) in _UNIONS else (t,)
        allowed: list[type] = []
        for a in arms:
            if not isinstance(a, type) or typing.get_origin(a) is not None \
                    or any(a is x for x in _NOT_PLAIN):
                return None
            allowed.append(a)
            if a is float:
                allowed.append(int)  # check_option_type: an int is a float
        out.append((f.name, tuple(allowed), t))
    return tuple(out)


def post_init(self: Any) -> None:
    cls = type(self)
    try:
        plan = _PLANS[cls]
    except KeyError:
        plan = _PLANS[cls] = plan_for(cls)
    if plan is None:
        assert ORIGINAL is not None
        ORIGINAL(self)
        return
    for name, allowed, t in plan:
        val = getattr(self, name)
        if not isinstance(val, allowed):
            # its own verdict and its own error text
            _typecheck.check_option_type(name, val, t)


post_init.agentgate_typecheck = True  # type: ignore[attr-defined]
post_init.agentgate_original = ORIGINAL  # type: ignore[attr-defined]


def check_pins() -> list[str]:
    """What no longer matches the mitmproxy internals the replacement stands in for."""
    bad = []
    if not mitmproxy_version.VERSION.startswith(PINNED_MITMPROXY):
        bad.append(f"mitmproxy {mitmproxy_version.VERSION} is not {PINNED_MITMPROXY}x")
    if ORIGINAL is None:
        bad.append("MessageData has no __post_init__ (python -O)")
        return bad
    try:
        src = inspect.getsource(ORIGINAL)
    except (OSError, TypeError):
        src = ""
    bad += [f"MessageData.__post_init__ no longer contains {f!r}"
            for f in _FRAGMENTS if f not in src]
    return bad


def install() -> bool:
    """Put the replacement on MessageData (once per process); False when mitmproxy's
    internals are not the ones it was written for (its own check stays)."""
    cls = http.MessageData
    if getattr(cls.__dict__.get("__post_init__"), _OURS, False):
        return True
    bad = check_pins()
    if bad:
        log.info("agentgate: mitmproxy's own message type check is kept (%s)",
                 "; ".join(bad))
        return False
    cls.__post_init__ = post_init  # type: ignore[method-assign]
    return True

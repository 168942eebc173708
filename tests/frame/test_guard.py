"""Fail closed: every hook of every addon is guarded, and a raising addon refuses the flow."""

from __future__ import annotations

import inspect
import json

import pytest
from mitmproxy import hooks
from mitmproxy.test import taddons, tflow

from addons import gateway
from addons.frame.guard import guarded

FLOW_HOOKS = sorted(name for name, h in hooks.all_hooks.items()
                    if "flow" in {f.name for f in __import__("dataclasses").fields(h)})


class Poison:
    """Stands in for an addon's `self`: any attribute access raises."""

    touched = False

    def __getattr__(self, name: str):
        Poison.touched = True
        raise RuntimeError(f"injected failure reading {name}")


def hook_methods(addon: object) -> list[tuple[str, object]]:
    return [(name, getattr(type(addon), name)) for name in FLOW_HOOKS
            if callable(getattr(type(addon), name, None))]


def all_hooks() -> list[tuple[str, str]]:
    out = []
    for addon in gateway.build():
        for name, _ in hook_methods(addon):
            out.append((type(addon).__name__, name))
    return out


def test_every_flow_hook_is_guarded() -> None:
    found = all_hooks()
    assert ("Credentials", "request") in found and ("Upstreams", "http_connect") in found
    for addon in gateway.build():
        for name, fn in hook_methods(addon):
            assert hasattr(fn, "__wrapped__"), f"{type(addon).__name__}.{name} is not @guarded"


def make_flow(hook: str):
    f = tflow.tflow()
    if hook in ("response", "responseheaders"):
        f = tflow.tflow(resp=True)
    if hook == "error":
        f = tflow.tflow(err=True)
    return f


@pytest.mark.parametrize("addon_name,hook", all_hooks())
def test_raising_addon_refuses_the_flow(addon_name: str, hook: str) -> None:
    addon = next(a for a in gateway.build() if type(a).__name__ == addon_name)
    fn = getattr(type(addon), hook)
    flow = make_flow(hook)
    Poison.touched = False
    with taddons.context():
        result = fn(Poison(), flow)
        if inspect.isawaitable(result):
            import asyncio
            asyncio.run(result)
    if not Poison.touched:
        pytest.skip(f"{addon_name}.{hook} does not read addon state for this flow")
    assert flow.response is not None, f"{addon_name}.{hook} let the flow pass"
    assert flow.response.status_code in (502, 503)
    body = json.loads(flow.response.content)
    assert "internal error in" in json.dumps(body)
    assert flow.metadata["refusal"]["code"] == "gateway_error"


def test_guard_refuses_in_request_and_replaces_response() -> None:
    class Boom:
        @guarded("boom")
        def request(self, flow):
            raise ValueError("secret-value-that-must-not-leak")

        @guarded("boom")
        def response(self, flow):
            raise ValueError("secret-value-that-must-not-leak")

    with taddons.context():
        f = tflow.tflow()
        Boom().request(f)
        assert f.response.status_code == 503
        assert b"secret-value" not in f.response.content
        assert json.loads(f.response.content)["error"]["code"] == "gateway_error"
        f = tflow.tflow(resp=True)
        Boom().response(f)
        assert f.response.status_code == 502


def test_guard_skips_answered_flows_on_request_path() -> None:
    calls = []

    class Step:
        @guarded("step")
        def request(self, flow):
            calls.append(flow)

    with taddons.context():
        f = tflow.tflow(resp=True)
        Step().request(f)
    assert calls == []


def test_async_hooks_are_guarded() -> None:
    import asyncio

    class Slow:
        @guarded("slow")
        async def request(self, flow):
            await asyncio.sleep(0)
            raise KeyError("x")

    with taddons.context():
        f = tflow.tflow()
        asyncio.run(Slow().request(f))
    assert f.response.status_code == 503
    assert f.metadata["refusal"]["step"] == "slow"


def test_anthropic_dialect_error_shape() -> None:
    class Boom:
        @guarded("boom")
        def request(self, flow):
            raise ValueError

    with taddons.context():
        f = tflow.tflow()
        f.request.path = "/v1/messages"
        Boom().request(f)
    body = json.loads(f.response.content)
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"


def test_lifecycle_hooks_are_sync() -> None:
    """On a script reload mitmproxy calls load/configure/running/done with
    invoke_addon_sync, which raises on coroutine hooks and aborts the reload."""
    for addon in gateway.build():
        for name in ("load", "configure", "running", "done"):
            fn = getattr(type(addon), name, None)
            if fn is not None:
                assert not inspect.iscoroutinefunction(fn), f"{type(addon).__name__}.{name}"

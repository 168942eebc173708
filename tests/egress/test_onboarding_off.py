"""mitmproxy's onboarding app (mitm.it) is off in the gateway: it ran before every hook of
ours at `request` and answered its host from the gateway itself. Through a real mitmdump
with the suite: a declared upstream named mitm.it goes through the pipeline to its upstream
(the stand-in) instead of getting mitmproxy's page; an operator's `--set onboarding=true`
is forced back, and said so in the log."""

from __future__ import annotations

import pytest

from tests.hostile.edgekit import assert_healthy, client
from tests.hostile.test_destinations import NO_ID

pytestmark = pytest.mark.integration


def test_onboarding_host_is_an_upstream_like_any_other(gateway_factory, standin) -> None:
    rules = ("{standin_upstreams}" + f"""\
  - name: onboarding-name
    hosts: [mitm.it]
    dialect: webhook
    forward_to: {standin.url}
""" + NO_ID)
    gw = gateway_factory(rules, extra_args=("--set", "onboarding=true"))
    assert "forcing" in gw.logs() and "onboarding=False" in gw.logs(), gw.logs()
    standin.clear()
    with client(gw) as c:
        r = c.get("https://mitm.it/cert/pem")
    assert "mitmproxy" not in r.text.lower(), r.text[:300]
    assert [q["path"] for q in standin.requests] == ["/cert/pem"], standin.requests
    assert_healthy(gw, standin)

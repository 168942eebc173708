"""mitmweb's own UI with web_port=0 binds a port no option shows: the egress check knows it
from the socket (Destinations.running registers what tornado serves), so rules forwarding to
it are refused like any other own listener, through a real mitmweb running the suite."""

from __future__ import annotations

import re
import time

from tests.hostile.test_destinations import NO_ID, assert_own_listener_refused


def test_mitmweb_ui_on_port_zero_is_never_an_upstream(gateway_factory, standin) -> None:
    gw = gateway_factory("{standin_upstreams}" + NO_ID, web=True,
                         extra_args=("--set", "web_port=0", "--set", "web_host=127.0.0.1"))
    deadline = time.monotonic() + 30
    while not (ports := re.findall(r"own listener \(mitmweb UI and reviewers' API\) on "
                                   r"127\.0\.0\.1:(\d+)", gw.logs())) \
            or "approvals API listening" not in gw.logs():
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.1)
    assert "Web server listening at http://127.0.0.1:0/" in gw.logs()  # mitmproxy says :0
    api = re.findall(r"approvals API listening at http://127\.0\.0\.1:(\d+)", gw.logs())
    ui = [int(p) for p in ports if p not in api]
    assert len(ui) == 1 and ui[0] != 0, gw.logs()
    assert_own_listener_refused(gw, standin, "console.example.com", ui[0], "/")

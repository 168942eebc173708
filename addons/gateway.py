"""The addon list mitmdump loads: `mitmdump -s addons/gateway.py`.

Order is the data path (ARCHITECTURE.md): rules -> upstreams -> identity -> sessions ->
policy -> masking -> approval -> credentials on the way out; masking (responses) and the
recorder on the way back. Addons talk only through `flow.metadata`. Two small addons sit
outside the script at the front of mitmproxy's chain: the pipeline sentinel (refuses all
traffic while this script is not loaded) and the credential scrubber.
"""

from __future__ import annotations

import logging

from addons.annotate import Annotate
from addons.approval import Approval
from addons.credentials import Credentials
from addons.identity import Identity
from addons.masking import Masking
from addons.policy import Policy
from addons.recorder import Recorder
from addons.rules_loader import RulesHolder, RulesLoader
from addons.sessions import Sessions
from addons.upstreams import Upstreams


def build(holder: RulesHolder | None = None) -> list[object]:
    holder = holder or RulesHolder()
    return [
        RulesLoader(holder),
        Upstreams(holder),
        Identity(holder),
        Sessions(holder),
        Policy(holder),
        Masking(holder),
        Approval(holder),
        Credentials(holder),
        Annotate(),
        Recorder(holder),
    ]


logging.getLogger("agentgate").setLevel(logging.INFO)
addons = build()

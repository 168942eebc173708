"""The addon list mitmdump loads: `mitmdump -s addons/gateway.py`.

Order is the data path (ARCHITECTURE.md): rules -> upstreams -> identity -> sessions ->
policy -> masking -> approval -> credentials on the way out; masking (responses) and the
recorder on the way back. Addons talk only through `flow.metadata`. Two small addons sit
outside the script at the front of mitmproxy's chain: the pipeline sentinel (refuses all
traffic while this script is not loaded) and the credential scrubber.
"""

from __future__ import annotations

import logging

from addons.approval.addon import Approval
from addons.config.addon import RulesLoader
from addons.config.holder import RulesHolder
from addons.egress.credentials import Credentials
from addons.egress.destination import Destinations
from addons.egress.edge import EdgeOptions
from addons.egress.upstreams import Upstreams
from addons.frame.annotate import Annotate
from addons.identity.addon import Identity
from addons.masking.addon import Masking
from addons.policy.addon import Policy
from addons.recording.addon import Recorder
from addons.recording.sessions import Sessions


def build(holder: RulesHolder | None = None) -> list[object]:
    holder = holder or RulesHolder()
    return [
        RulesLoader(holder),
        EdgeOptions(),
        Upstreams(holder),
        Destinations(holder),
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

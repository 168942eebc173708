"""agentgate: a zero-trust data-path gateway for AI agents, as mitmproxy addons."""

__version__ = "0.1.0"

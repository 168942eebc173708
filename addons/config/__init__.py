"""Rules: schema helpers (a leaf), the holder every addon reads, the loader that knows every
concern's section, the reload addon and `agentgate rules check`."""

"""`agentgate connect`: the agent-side forwarder (a loopback HTTP proxy that adds a fresh token).

Agent-side code: it imports nothing of the gateway's data path (tests/test_layout.py).
"""

"""MCP (Model Context Protocol) tool servers through the gateway: JSON-RPC parsing,
method allow-list, tool pinning and description scan, server-to-client request refusal."""

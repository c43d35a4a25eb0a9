"""MCP: multibot's own server for its agents (tools.py, on rpc.py), and the servers a project
configures for its workers (servers.py)."""

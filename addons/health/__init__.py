"""Readiness and liveness probes, graceful drain on SIGTERM."""

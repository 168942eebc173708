"""Held flows and their reviewers: store, API, notifications, CLI."""

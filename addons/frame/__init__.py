"""Shared plumbing of every addon: the fail-closed guard, errors in the caller's dialect,
the pipeline sentinel, mitmweb annotations and the shared request-body parse."""

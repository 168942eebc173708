"""Every flow to DuckDB from a background writer: sessions, hash chain, query, export."""

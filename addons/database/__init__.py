"""database: the Postgres wire-protocol path (issue 14). See addons/database/README.md."""

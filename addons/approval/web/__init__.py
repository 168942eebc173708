"""The reviewers' web application: tornado app, OIDC login, sessions, rendering."""

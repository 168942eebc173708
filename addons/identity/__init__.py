"""Who is calling: OIDC token discovery, verification (python-jose) and binding to the flow."""

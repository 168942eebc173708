"""Where traffic may go and with which credential: declared upstreams (default-deny) and the
real credential injected last."""

"""Rules to one decision per request: allow, block, hold for approval, observe."""

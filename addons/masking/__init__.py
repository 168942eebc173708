"""PII and secrets masked in every place a value travels: detectors, normalisation,
placement in bodies and streams, optional restore."""

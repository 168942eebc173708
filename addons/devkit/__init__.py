"""What tests, the demo and the benchmarks start (stand-in upstream, local IdP, launchers,
the demo agent). Never imported by the gateway."""

"""agentgate benchmarks: `python -m bench [--quick] [--only NAME…] [--soak-minutes N]`.

- `bench.harness`: shared pieces (upstreams, mitmdump processes, `hey`, RSS sampling, the
  machine facts) with no dependency on the gateway's own modules beyond the stand-in.
- `bench.e2e`: the end-to-end comparison direct / bare mitmdump / full agentgate suite.
- `bench.bench_<concern>`: component micro-benchmarks, each exposing
  `run(quick: bool = False) -> dict` and `markdown(results: dict) -> str`.

`python -m bench` runs everything once and writes BENCHMARKS.md at the repository root.
"""

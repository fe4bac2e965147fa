"""Experiments on the yardstick: the runner behind `dcfast demo` (concepts -> train -> evaluate ->
report, `runner`), the regimes it trains with (`regimes`), the demo's photo concepts (`photos`), and
the seeded method and world benches (`bench_methods`, `bench_world`).

May import: everything below it: `dcfast.world`, `dcfast.training`, `dcfast.eval`, `dcfast.io`, `dcfast.models`.
"""

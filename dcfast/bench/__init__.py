"""Benchmarks users run on their own machine (`dcfast bench dc-scores|fisher|train`): the fused engines
against the naive loops they replace, and a training step of each method.

May import: `dcfast.engine`, `dcfast.models`, `dcfast.training`. The quality benches live in `dcfast.experiments`.
"""

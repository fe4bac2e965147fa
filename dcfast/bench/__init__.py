"""Benchmarks behind `dcfast bench ...`: fused engines against the naive loops they replace."""

"""Benchmark case definitions, one file per op (each registers an :class:`~fastseg.bench.registry.OpSpec`)."""

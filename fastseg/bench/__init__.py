"""Benchmark and memory-profile machinery behind the ``fastseg`` command.

* :mod:`~fastseg.bench.env` — environment (device, versions, commit, date);
* :mod:`~fastseg.bench.measure` — timing (``do_bench`` on CUDA, wall clock on CPU), peak memory, OOM handling;
* :mod:`~fastseg.bench.registry` — ops, implementations and shape presets; :mod:`fastseg.bench.ops` the cases;
* :mod:`~fastseg.bench.runner`, :mod:`~fastseg.bench.report` — sweeps, rich tables, CSV/JSON;
* :mod:`~fastseg.bench.memprof`, :mod:`~fastseg.bench.plot` — queries × resolution sweeps and heat maps;
* :mod:`~fastseg.bench.check` — fused op vs reference on small inputs.
"""

"""fastseg's Triton kernels, one file per kernel family (installed as ``fastseg.kernels``).

Each file holds the ``@triton.jit`` kernels of one op and the launch functions that call them; the
launchers take plain tensors and call :func:`fastseg._backend.record_launch` before each launch.
Autograd lives in :mod:`fastseg.ops`, modules in :mod:`fastseg.nn`.
"""

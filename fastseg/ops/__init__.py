"""Differentiable fused ops (autograd over the Triton kernels, dispatched by :mod:`fastseg._backend`)."""
from .msca import msca

__all__ = ["msca"]

"""Differentiable fused ops (autograd over the Triton kernels, dispatched by :mod:`fastseg._backend`)."""
from .mlp_dwconv import dwconv3x3_gelu
from .msca import msca

__all__ = ["msca", "dwconv3x3_gelu"]

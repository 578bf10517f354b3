"""Functional ops with autograd, dispatching to the Triton kernels (see :mod:`fastseg._backend`)."""
from .context_cluster import context_cluster, context_cluster_packed

__all__ = ["context_cluster", "context_cluster_packed"]

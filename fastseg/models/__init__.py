"""Reference models built from fastseg's reference modules (``fused=True`` swaps in the Triton modules)."""
from .context_cluster import ContextClusterNet, coc_medium, coc_small, coc_tiny

__all__ = ["ContextClusterNet", "coc_tiny", "coc_small", "coc_medium"]

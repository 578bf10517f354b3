"""Drop-in ``nn.Module`` replacements (same constructors and state_dicts as the originals)."""
from .context_cluster import ContextCluster

__all__ = ["ContextCluster"]

"""Drop-in ``nn.Module`` replacements (same constructors and state_dicts as the originals)."""
from .context_cluster import ContextCluster
from .masked_attention import MaskedCrossAttention

__all__ = ["ContextCluster", "MaskedCrossAttention"]

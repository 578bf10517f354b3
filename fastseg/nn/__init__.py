"""Drop-in ``nn.Module`` replacements (same constructors and state_dicts as the originals)."""
from .context_cluster import ContextCluster
from .masked_attention import MaskedCrossAttention
from .mlp_dwconv import MSCANMlp
from .msca import MSCA

__all__ = ["ContextCluster", "MaskedCrossAttention", "MSCA", "MSCANMlp"]

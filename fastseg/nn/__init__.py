"""Drop-in ``nn.Module`` replacements (same constructors and state_dicts as the originals)."""
from .atm_attention import ATMAttention
from .cac import ContextAwareClassifier
from .context_cluster import ContextCluster
from .masked_attention import MaskedCrossAttention
from .mlp_dwconv import MSCANMlp
from .ms_deform_attn import MSDeformAttn, MSDeformAttnHF
from .msca import MSCA
from .mscan_block import MSCANBlock

__all__ = ["ATMAttention", "ContextAwareClassifier", "ContextCluster", "MaskedCrossAttention", "MSCA", "MSCANMlp", "MSCANBlock",
           "MSDeformAttn", "MSDeformAttnHF"]

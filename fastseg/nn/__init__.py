"""Drop-in ``nn.Module`` replacements (same constructors and state_dicts as the originals)."""
from .masked_attention import MaskedCrossAttention

__all__ = ["MaskedCrossAttention"]

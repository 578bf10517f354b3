"""Drop-in ``nn.Module`` replacements (same constructors and state_dicts as the originals)."""
from .mlp_dwconv import MSCANMlp
from .msca import MSCA

__all__ = ["MSCA", "MSCANMlp"]

"""Reference models built from fastseg's reference modules (``fused=True`` swaps in the Triton modules)."""
from .ham_head import LightHamHead, SegNeXt, segnext_b, segnext_l, segnext_s, segnext_t
from .mscan import MSCAN, mscan_b, mscan_l, mscan_s, mscan_t, use_fused_msca

__all__ = ["MSCAN", "mscan_t", "mscan_s", "mscan_b", "mscan_l", "use_fused_msca",
           "LightHamHead", "SegNeXt", "segnext_t", "segnext_s", "segnext_b", "segnext_l"]

"""fastseg: fused Triton kernels (forward and backward) for segmentation models.

* :mod:`fastseg.ops` — functional ops with autograd (masked attention, ...).
* :mod:`fastseg.nn` — drop-in ``nn.Module`` replacements with the originals' constructors and state_dicts.
* :mod:`fastseg.reference` — faithful plain-PyTorch implementations the kernels are tested against.
* :mod:`fastseg.models` — reference models (Mask2Former, MSCAN, CoC, ...).
* :mod:`fastseg.kernels` — the Triton kernels themselves (source folder ``kernels/``).

Dispatch (see :mod:`fastseg._backend`): CUDA tensors run compiled Triton kernels; CPU tensors run the same
kernels under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before import, else a PyTorch path.
"""
from ._backend import interpreter_enabled, launches, use_backend
from . import models, nn, ops, reference
from .patch import PatchReport, patch

__version__ = "0.1.0"

__all__ = ["models", "nn", "ops", "reference", "patch", "PatchReport", "use_backend", "launches",
           "interpreter_enabled", "__version__"]

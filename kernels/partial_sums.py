"""Fixed-order reduction of per-tile partial sums: out[l] = sum_r part[r, l], cast to out's dtype.

The depthwise backward kernels (MSCA, MLP dwconv) write per-tile weight-gradient partials (no atomics, so
the result is deterministic); one launch of ``_sum_rows_kernel`` reduces them and writes the gradients
directly in the parameters' dtype and layout (a flat buffer whose slices are the parameters' gradients).
part: (R, L) fp32/fp64 row-major; out: (L,) any float dtype. Accumulates in part's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg._backend import interpreter_enabled, record_launch

__all__ = ["sum_rows"]


@triton.jit(do_not_specialize=["R", "L"])
def _sum_rows_kernel(part_ptr, out_ptr, R, L, BR: tl.constexpr, BL: tl.constexpr):
    cols = tl.program_id(0) * BL + tl.arange(0, BL)
    cm = cols < L
    acc = tl.zeros([BR, BL], part_ptr.dtype.element_ty)
    for r0 in range(0, R, BR):
        rows = r0 + tl.arange(0, BR)
        acc += tl.load(part_ptr + rows[:, None].to(tl.int64) * L + cols[None, :],
                       mask=(rows[:, None] < R) & cm[None, :], other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cm)


def sum_rows(part: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """(R, L) partials -> (L,) sums in ``dtype`` (one launch, counted as ``name``)."""
    R, L = part.shape
    assert part.is_contiguous()
    out = torch.empty(L, dtype=dtype, device=part.device)
    if interpreter_enabled():
        BR, BL = 16, 128
    else:
        # columns per program: enough programs for every SM twice when L is small (the MLP dwconv's
        # channels_last partials, L = 2 560 over 8 192 rows, had 10 programs at BL = 256), 256 at most; every
        # step still reads BR x BL = 2 048 elements
        sms = torch.cuda.get_device_properties(part.device).multi_processor_count if part.is_cuda else 132
        BL = min(256, max(32, triton.next_power_of_2(triton.cdiv(L, 2 * sms))))
        BR = 2048 // BL
    record_launch(name)
    _sum_rows_kernel[(triton.cdiv(L, BL),)](part, out, R, L, BR=BR, BL=BL, num_warps=4)
    return out

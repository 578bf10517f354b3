"""Poisoned CUDA memory for the GPU tests: an output element a kernel never writes reads as NaN.

``torch.empty`` on CUDA hands out blocks of the caching allocator's pool without clearing them.
:func:`poison_cuda_cache` releases the cached blocks, allocates a large block (it serves every later
allocation above 1 MiB, split as needed) and 2 MiB segments of the small pool (allocations up to 1 MiB), fills
them with 0xFF bytes and frees them back to the cache: every buffer allocated afterwards (up to the large
block's size) starts as 0xFF bytes, which is NaN in fp32 / fp16 / bf16 (and -1 in integer buffers), so a
missing write fails the comparison (``assert_close`` rejects non-finite outputs).

As a pytest plugin (``-p poison``, with tests/gpu on ``sys.path``) every test starts poisoned.
"""
import pytest
import torch

LARGE = 2 << 30  # bytes of the large block (capped at half the free memory)
SMALL_SEGMENTS = 32  # 2 MiB segments of the small pool


def poison_cuda_cache(large: int = LARGE, small_segments: int = SMALL_SEGMENTS) -> bool:
    """Fill the CUDA caching allocator's free memory with 0xFF; False (nothing done) without CUDA."""
    if not torch.cuda.is_available():
        return False
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    big = torch.empty(int(min(large, free // 2)), dtype=torch.uint8, device="cuda").fill_(0xFF)
    # 1 MiB is the small pool's largest request: two per 2 MiB segment
    small = [torch.empty(1 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF) for _ in range(2 * small_segments)]
    torch.cuda.synchronize()
    del big, small  # back to the cache, not to the driver: the next allocations reuse these bytes
    return True


@pytest.fixture(autouse=True)
def _poisoned_cuda_memory():
    poison_cuda_cache()
    yield

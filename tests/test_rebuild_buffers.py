"""The direction rebuild writes every block's ``V`` and ``M`` GEMMs into two buffers allocated once
per call: fresh block-sized tensors per block cost page faults on every block (measured by
``benchmarks/step_before_after.py --layer``; docs/performance.md)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from loft.linalg import packed_index, projected_adam_direction


def block_allocations(shape, block_bytes, chunk_bytes):
    """Allocations of exactly ``block_bytes`` made by one rebuild of ``shape`` ``(b, l, r, k)``
    (``b`` None: unbatched), and the result."""
    b, l, r, k = shape
    g = torch.Generator().manual_seed(0)
    lead = () if b is None else (b,)
    index = packed_index(r, False, torch.float64, torch.device("cpu"))
    partner = torch.randn(*lead, l, r, generator=g, dtype=torch.float64)
    avg = torch.randn(*lead, r, k, generator=g, dtype=torch.float64)
    sq = torch.rand(*lead, k, index.size, generator=g, dtype=torch.float64)
    kw = dict(bias_correction1=0.5, bias_correction2=0.1, eps=1e-8)
    with profile(profile_memory=True) as prof:
        out = projected_adam_direction(partner, avg, sq, index, chunk_bytes=chunk_bytes, **kw)
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]  # not the callers'
    whole = projected_adam_direction(partner, avg, sq, index, chunk_bytes=2**30, **kw)
    return sizes.count(block_bytes), out, whole


ROW = 2 * 64 * 8  # one row of V and of M at k = 64, float64


@pytest.mark.parametrize(
    "shape, chunk_bytes, block_bytes",
    [
        ((None, 256, 4, 64), 16 * ROW, 16 * 64 * 8),  # one pair: 16 blocks of 16 rows
        ((3, 256, 4, 64), 16 * ROW, 16 * 64 * 8),  # pairs too large for a block: each pair's rows in 16 blocks
        ((8, 16, 3, 64), 2 * 16 * ROW, 2 * 16 * 64 * 8),  # whole pairs per block: 4 blocks of 2 pairs
    ],
)
def test_two_block_buffers_per_rebuild_however_many_blocks(shape, chunk_bytes, block_bytes):
    count, out, whole = block_allocations(shape, block_bytes, chunk_bytes)
    assert count == 2, f"{count} block-sized allocations"
    assert torch.allclose(out, whole, rtol=1e-12, atol=0) and out.abs().max() > 0

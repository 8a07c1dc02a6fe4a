"""Scale a wide gradient accumulator by a device scalar and cast it to the parameter's dtype.

The last step of every fused backward: ``grad_weight`` is accumulated in float32 over the chunks
and must come back in the weight's dtype, times ``grad_output``. ``torch.mul(acc, s, out=bf16)``
does that in one pass, but PyTorch's elementwise kernel takes its unvectorised dynamic-casting
path when the output dtype differs from the computation's, at about half the device's copy
rate (docs/design.md, "What moved"). This kernel reads each float32 once and writes each half once with wide
accesses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["scaled_cast"]

_BLOCK = 4096
_NUM_WARPS = 8


@triton.jit
def _scaled_cast_kernel(X, Y, SCALE, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(SCALE).to(tl.float32)
    x = tl.load(X + offs, mask=mask)
    tl.store(Y + offs, (x * scale).to(Y.dtype.element_ty), mask=mask)


def scaled_cast(
    x: Tensor,  # (...) float32, contiguous
    scale: Tensor,  # () any float dtype, on x's device
    dtype: torch.dtype,
) -> Tensor:
    """``(x * scale).to(dtype)`` in one pass, the product formed in float32."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    if n:
        _scaled_cast_kernel[(triton.cdiv(n, _BLOCK),)](x, out, scale, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out

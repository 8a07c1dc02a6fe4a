"""The per-call scalars every chunk function reads: one 1-D tensor in the compute dtype, on the
inputs' device, so that changing a number never recompiles. Its slots are named here only; the
Triton kernels read the same names (as ``tl.constexpr``)."""

from __future__ import annotations

__all__ = ["CAP", "HARD_W", "INV_T", "PARAMS", "SOFT_W"]

INV_T = 0  # 1 / temperature (the divergence's logits only; the hard CE is at temperature 1)
SOFT_W = 1  # the divergence's weight
HARD_W = 2  # the hard cross-entropy's weight
CAP = 3  # the softcap (1.0, and unread, without one)
PARAMS = 4  # the divergence's tensor arguments (kdfuse.divergences.Parametrized.args) start here

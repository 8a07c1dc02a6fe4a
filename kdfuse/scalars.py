"""The per-call scalars every chunk function reads: one 1-D tensor in the compute dtype, on the
inputs' device, so that changing a number never recompiles. Its slots are named here only; the
Triton kernels read the same names (as ``tl.constexpr``)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["HARD_W", "INV_T", "PARAMS", "SOFT_W", "S_CAP", "T_CAP", "cap"]

INV_T = 0  # 1 / temperature (the divergence's logits only; the hard CE is at temperature 1)
SOFT_W = 1  # the divergence's weight
HARD_W = 2  # the hard cross-entropy's weight
S_CAP = 3  # the student's softcap (1.0, and unread, without one)
T_CAP = 4  # the teacher's softcap (likewise)
PARAMS = 5  # the divergence's tensor arguments (kdfuse.divergences.Parametrized.args) start here


def cap(logits: Tensor, scalars: Tensor, slot: int, on: bool) -> Tensor:
    """Gemma-2's softcap ``c·tanh(x / c)`` with c the scalars' ``slot`` (S_CAP, T_CAP), if ``on``."""
    if not on:
        return logits
    c = scalars[slot]
    return c * (logits / c).tanh()

"""The public types of a distillation call: what it takes (:data:`Reduction`, :data:`Impl`) and
what ``return_parts=True`` returns (:class:`DistillOutput`). Shared by the combinator, its
reference and the module, so the reference depends on no part of the implementation."""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import Tensor

__all__ = ["DistillOutput", "Impl", "Reduction"]

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["compile", "eager"]


class DistillOutput(NamedTuple):
    """``return_parts=True`` result: the loss and its two unweighted, detached parts.
    ``hard_loss`` is 0 when ``hard_weight`` is 0: the cross-entropy is then not computed."""

    loss: Tensor
    soft_loss: Tensor
    hard_loss: Tensor

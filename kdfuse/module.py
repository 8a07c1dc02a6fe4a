"""``nn.Module`` wrapper: holds the options, forwards to :func:`kdfuse.fused_linear_distill`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from torch import Tensor, nn

from .contract import DistillOutput, Impl, Reduction
from .fused import fused_linear_distill
from .registry import DivergenceLike, stable_name

__all__ = ["DistillLoss", "DistillOptions"]


@dataclass
class DistillOptions:
    """The keyword options of :func:`kdfuse.fused_linear_distill` that do not change per batch."""

    divergence: DivergenceLike = "forward_kl"
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
    reduction: Reduction = "mean"
    chunk_size: int | Literal["auto"] = "auto"
    softcap: float | None = None
    return_parts: bool = False
    impl: Impl = "compile"
    memory_budget: int | float | None = None
    validate: bool = True
    process_group: object = None  # a tensor-parallel group (or 1-D DeviceMesh) the vocabulary is split over


class DistillLoss(nn.Module):
    """``DistillLoss(divergence=D.jsd(0.3), temperature=2.0, hard_weight=0.5)(h, W, th, tW, labels=y)``."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = DistillOptions(**options)

    def forward(
        self,
        student_hidden: Tensor,  # (..., Hs)
        student_weight: Tensor,  # (V, Hs)
        teacher_hidden: Tensor | None = None,  # (..., Ht)
        teacher_weight: Tensor | None = None,  # (Vt, Ht)
        **per_call,  # labels, teacher_logits, biases, normalizer, or any option to override
    ) -> Tensor | DistillOutput:
        # Not dataclasses.asdict: it deep-copies the values, so a callable-object divergence would
        # be a new object (a new compile-cache key, a recompile) on every call.
        options = {f.name: getattr(self.options, f.name) for f in fields(self.options)}
        kwargs = {**options, **per_call}
        return fused_linear_distill(student_hidden, student_weight, teacher_hidden, teacher_weight, **kwargs)

    def extra_repr(self) -> str:
        name = stable_name(self.options.divergence)
        return f"divergence={name}, temperature={self.options.temperature}, reduction={self.options.reduction}"

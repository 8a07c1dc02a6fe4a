"""kdfuse: fast, memory-lean, exact knowledge-distillation losses for LLMs."""

from . import divergences, topk
from .divergences import Divergence
from .fused import DistillOutput, fused_linear_distill
from .module import DistillLoss, DistillOptions
from .reference import fused_linear_distill_ref
from .topk import SparseDivergence, teacher_topk

__version__ = "0.1.0"

__all__ = [
    "Divergence",
    "DistillLoss",
    "DistillOptions",
    "DistillOutput",
    "SparseDivergence",
    "divergences",
    "fused_linear_distill",
    "fused_linear_distill_ref",
    "teacher_topk",
    "topk",
    "__version__",
]

"""kdfuse: fast, memory-lean, exact knowledge-distillation losses for LLMs."""

from . import divergences, topk
from ._version import __version__
from .contract import DistillOutput
from .divergences import Divergence, Parametrized
from .extract import teacher_topk
from .fused import distill_logits, fused_linear_distill
from .module import DistillLoss, DistillOptions
from .reference import fused_linear_distill_ref
from .topk import SparseDivergence

__all__ = [
    "DistillLoss",
    "DistillOptions",
    "DistillOutput",
    "Divergence",
    "Parametrized",
    "SparseDivergence",
    "__version__",
    "distill_logits",
    "divergences",
    "fused_linear_distill",
    "fused_linear_distill_ref",
    "teacher_topk",
    "topk",
]

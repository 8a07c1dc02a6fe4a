"""A teacher's top-k token ids and exact log-probs, chunk by chunk, never holding all its logits.

What :func:`kdfuse.teacher_topk` computes: the teacher side of the sparse divergences in
:mod:`kdfuse.topk` (``fused_linear_distill(..., teacher_topk=(ids, logprobs))``), and what
``tools/topk_shards.py`` caches on disk.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .tuning import heuristic_chunk_size
from .validate import check_chunk_size, check_float_tensor, check_int, check_positive, shape

__all__ = ["teacher_topk"]


def _check_topk_args(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    temperature: float,
    chunk_size: int | str,
    bias: Tensor | None,
    softcap: float | None,
    vocab: int | None,
) -> int:
    """Raise ``ValueError``/``TypeError`` naming the argument; return the vocabulary used."""
    check_float_tensor("teacher_hidden", hidden)
    check_float_tensor("teacher_weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"teacher_weight must be (Vt, Ht), got shape {shape(weight)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"teacher_hidden ({hidden.dtype}) and teacher_weight ({weight.dtype}) must share a dtype")
    full_vocab, width = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != width:
        raise ValueError(
            f"teacher_hidden's last dim must equal teacher_weight's Ht={width}: "
            f"teacher_hidden {shape(hidden)}, teacher_weight {shape(weight)}"
        )
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (full_vocab,)):
        raise ValueError(
            f"teacher_bias must be (Vt,) = ({full_vocab},) like teacher_weight {shape(weight)}, "
            f"got {shape(bias) if isinstance(bias, Tensor) else type(bias).__name__}"
        )
    vocab = full_vocab if vocab is None else check_int("vocab", vocab, 1, full_vocab, "Vt")
    check_int("k", k, 1, vocab, "V")
    check_positive("temperature", temperature)
    if softcap is not None:
        check_positive("softcap", softcap)
    check_chunk_size(chunk_size)
    return vocab


def _chunk_topk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, temperature: float, softcap: float | None
) -> tuple[Tensor, Tensor]:
    """(ids (C, k), logprobs (C, k)) of one chunk, in the compute dtype; the order of operations
    matches the combinator's (matmul in the input dtype, cap, then divide by T)."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden, weight, bias).to(compute)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    top, ids = logits.topk(k, dim=-1)
    # log p = logit − logsumexp over the whole vocabulary: exact, not renormalised to the top-k.
    return ids, top - logits.logsumexp(-1, keepdim=True)


@torch.no_grad()
def teacher_topk(
    teacher_hidden: Tensor,  # (..., Ht)
    teacher_weight: Tensor,  # (Vt, Ht)
    k: int,
    *,
    temperature: float = 1.0,
    chunk_size: int | Literal["auto"] = "auto",
    teacher_bias: Tensor | None = None,  # (Vt,)
    softcap: float | None = None,
    vocab: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The teacher's top-k token ids and exact log-probabilities, never materialising all logits.

    Rows (the flattened leading dims) are processed ``chunk_size`` at a time: logits =
    ``hidden @ W.T (+ bias)`` (in the input dtype, then float32; float64 for float64 inputs),
    optionally soft-capped (``softcap·tanh(logits/softcap)``), divided by ``temperature``, then
    log-probs = logits − logsumexp over the whole vocabulary and ``torch.topk``. Ids come sorted
    by decreasing log-prob.

    Args:
        teacher_hidden, teacher_weight: the teacher's final hidden states and lm_head weight.
        k: tokens kept per row, in ``[1, V]``.
        temperature: the teacher's sampling temperature; it shapes the cached distribution (the
            sparse divergences never rescale it).
        chunk_size: rows per chunk, or ``"auto"``
            (:func:`kdfuse.tuning.heuristic_chunk_size`).
        teacher_bias: lm_head bias, ``(Vt,)``.
        softcap: Gemma-2 style final-logit soft-capping, applied before the temperature.
        vocab: keep only the first ``vocab`` columns (drop padded embedding rows).

    Returns:
        ``(ids (..., k) int64, logprobs (..., k) float32)``.
    """
    vocab = _check_topk_args(teacher_hidden, teacher_weight, k, temperature, chunk_size, teacher_bias, softcap, vocab)
    leading = teacher_hidden.shape[:-1]
    hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    weight = teacher_weight[:vocab]
    bias = None if teacher_bias is None else teacher_bias[:vocab]
    rows, device = hidden.shape[0], hidden.device
    ids = torch.empty(rows, k, dtype=torch.int64, device=device)
    logprobs = torch.empty(rows, k, dtype=torch.float32, device=device)
    size = heuristic_chunk_size(rows, vocab, device.type) if chunk_size == "auto" else chunk_size
    for start in range(0, rows, size):
        chunk = slice(start, start + size)
        ids[chunk], logprobs[chunk] = _chunk_topk(hidden[chunk], weight, bias, k, temperature, softcap)
    return ids.reshape(*leading, k), logprobs.reshape(*leading, k)

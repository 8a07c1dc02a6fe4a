"""How ``chunk_size="auto"`` becomes a number of rows per chunk."""

from __future__ import annotations

import torch

__all__ = ["heuristic_chunk_size", "resolve_chunk_size"]

# Elements of one (chunk, V) logits block to aim for. On a GPU ~2^28 keeps the chunk's logits,
# teacher logits and logit gradient (bf16) around 1.5 GiB at V=128k while making the chunk GEMMs
# long enough to run near peak; on a CPU a smaller block stays closer to the caches.
_TARGET_ELEMENTS = {"cuda": 2**28, "cpu": 2**22}
_MIN_CHUNK, _MAX_CHUNK = 16, 8192


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def heuristic_chunk_size(rows: int, vocab: int, device_type: str) -> int:
    """A power of two near ``target / vocab``, never above the next power of two of ``rows``
    (a short batch is one chunk) and within [16, 8192]."""
    target = _TARGET_ELEMENTS.get(device_type, _TARGET_ELEMENTS["cuda"])
    size = min(max(_pow2_floor(target // max(vocab, 1)), _MIN_CHUNK), _MAX_CHUNK)
    return min(size, _pow2_ceil(rows))


def resolve_chunk_size(
    chunk_size: int | str,
    *,
    rows: int,
    vocab: int,
    student_hidden: int,
    teacher_hidden: int | None,
    dtype: torch.dtype,
    device: torch.device,
    divergence: str,
    with_ce: bool,
    with_grad: bool,
) -> int:
    """The chunk size to use: ``chunk_size`` itself when it is an int, else the heuristic."""
    if chunk_size != "auto":
        return int(chunk_size)
    return heuristic_chunk_size(rows, vocab, device.type)

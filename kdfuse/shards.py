"""Teacher top-k log-probs cached on disk: a resumable shard writer and a lazy torch Dataset.

Layout of ``out_dir``::

    manifest.json        format, version, k, seq_len, temperature, softcap, vocab, dtype, counts,
                         the shard list, user metadata, and whether writing completed
    shard-00000.npz      tokens (S, T) (the token file's integer dtype), ids (S, T, k) int32,
    shard-00001.npz      logprobs (S, T, k) float16 or float32
    ...

The token array is cut into ``len(tokens) // seq_len`` consecutive, non-overlapping sequences
(a shorter tail is dropped); shard ``i`` holds sequences ``[i·S, (i+1)·S)``. Position ``t`` of a
sequence stores the teacher's top-k for the token *after* ``tokens[..t]`` (next-token
prediction, like the logits at that position).

Writing is atomic per shard (:func:`autotune.write_atomic`: a temporary file, then a rename)
and resumable: a shard file that exists is complete, so a rerun skips it; a crash mid-shard
leaves only a ``.shard-*.tmp`` temporary, which the next run removes. The manifest is written
first (``"complete": false``) so a resume can refuse to mix shards of a different
configuration, and rewritten with ``"complete": true`` at the end; the
loader reads only complete directories. One writer per directory.

float16 log-probs halve the disk size at about 3 significant digits (a relative error in p_k of
up to ~0.8% for log-probs in [-16, -8]); their exponentials can sum to a little over 1, which the
sparse divergences treat as exactly 1. Log-probs below float16's range become ``-inf``, which the
sparse divergences read as padding (probability 0).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from autotune import write_atomic

from .extract import teacher_topk
from .validate import check_choice, check_int

__all__ = ["FORMAT", "MANIFEST", "VERSION", "HiddenFn", "LogprobDtype", "TopkShards", "shard_name", "write_topk_shards"]

FORMAT = "kdfuse-topk-shards"
VERSION = 1
MANIFEST = "manifest.json"

HiddenFn = Callable[[Tensor], Tensor]
"""``input_ids (B, T) int64 -> hidden (B, T, H)``: the teacher's trunk, final norm included."""

LogprobDtype = Literal["float16", "float32"]

# Manifest keys that must match for a resume to reuse existing shards.
_CONFIG_KEYS = (
    "format",
    "version",
    "k",
    "seq_len",
    "temperature",
    "softcap",
    "vocab",
    "dtype",
    "token_dtype",
    "num_tokens",
    "num_sequences",
    "sequences_per_shard",
    "metadata",
)


# Shards, and the temporaries a crash mid-write leaves (autotune.write_atomic's names).
_SHARD_FILE = re.compile(r"shard-\d{5,}\.npz")
_TEMPORARY = re.compile(r"\.shard-\d{5,}\.npz\..+\.tmp")


def shard_name(index: int) -> str:
    """``shard-00012.npz``."""
    return f"shard-{index:05d}.npz"


def _remove(out_dir: Path, *patterns: re.Pattern) -> None:
    """Delete the files in ``out_dir`` whose names match one of ``patterns``, nothing else."""
    for path in out_dir.iterdir():
        if any(p.fullmatch(path.name) for p in patterns):
            path.unlink()


def _write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    write_atomic(out_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    with open(out_dir / MANIFEST) as f:
        return json.load(f)


def _plan(
    tokens: np.ndarray,
    *,
    k: int,
    seq_len: int,
    sequences_per_shard: int,
    temperature: float,
    softcap: float | None,
    vocab: int,
    dtype: str,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest for writing ``tokens``, ``"complete": false``, as JSON reads it back."""
    num_sequences = len(tokens) // seq_len
    counts = [min(sequences_per_shard, num_sequences - start) for start in range(0, num_sequences, sequences_per_shard)]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "k": k,
        "seq_len": seq_len,
        "temperature": float(temperature),
        "softcap": None if softcap is None else float(softcap),
        "vocab": vocab,
        "dtype": dtype,
        "token_dtype": np.dtype(tokens.dtype).name,
        "num_tokens": len(tokens),
        "num_sequences": num_sequences,
        "sequences_per_shard": sequences_per_shard,
        "shards": [{"file": shard_name(i), "sequences": n} for i, n in enumerate(counts)],
        "metadata": dict(metadata),
        "complete": False,
    }
    # Round-tripped so that a resume compares like with like: metadata that JSON changes on the
    # way to disk (tuples become lists, keys strings) must not read as another configuration.
    return json.loads(json.dumps(manifest))


def _check_resumable(existing: Mapping[str, Any], planned: Mapping[str, Any], out_dir: Path) -> None:
    different = [key for key in _CONFIG_KEYS if existing.get(key) != planned[key]]
    if different:
        detail = ", ".join(f"{key}: {existing.get(key)!r} on disk, {planned[key]!r} now" for key in different)
        raise ValueError(
            f"{out_dir} holds shards of a different configuration ({detail}); "
            "use another directory or resume=False to overwrite"
        )


def _shard_arrays(
    hidden_fn: HiddenFn,
    weight: Tensor,
    bias: Tensor | None,
    sequences: np.ndarray,  # (S, T) tokens of one shard
    *,
    k: int,
    batch_size: int,
    temperature: float,
    softcap: float | None,
    vocab: int,
    chunk_size: int | str,
    dtype: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids (S, T, k) int32, logprobs (S, T, k) ``dtype``) for one shard, ``batch_size`` sequences
    through the teacher at a time."""
    count, seq_len = sequences.shape
    ids = np.empty((count, seq_len, k), dtype=np.int32)
    logprobs = np.empty((count, seq_len, k), dtype=dtype)
    for start in range(0, count, batch_size):
        batch = slice(start, start + batch_size)
        input_ids = torch.from_numpy(sequences[batch].astype(np.int64)).to(weight.device)
        with torch.no_grad():
            hidden = hidden_fn(input_ids)
        top_ids, top_lp = teacher_topk(
            hidden,
            weight,
            k,
            temperature=temperature,
            chunk_size=chunk_size,
            teacher_bias=bias,
            softcap=softcap,
            vocab=vocab,
        )
        ids[batch] = top_ids.cpu().numpy()
        logprobs[batch] = top_lp.cpu().numpy()
    return ids, logprobs


def _check_write_args(tokens, lm_head_weight, k, seq_len, batch_size, sequences_per_shard, dtype, vocab) -> int:
    """Raise ``ValueError`` naming the argument; return the vocabulary kept."""
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    for name, value in (
        ("k", k),
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("sequences_per_shard", sequences_per_shard),
    ):
        check_int(name, value)
    check_choice("dtype", dtype, ("float16", "float32"))
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be (Vt, H), got shape {tuple(lm_head_weight.shape)}")
    vocab = lm_head_weight.shape[0] if vocab is None else vocab
    if not 1 <= k <= vocab <= lm_head_weight.shape[0]:
        raise ValueError(
            f"need 1 <= k <= vocab <= Vt: k={k}, vocab={vocab}, lm_head_weight {tuple(lm_head_weight.shape)}"
        )
    if len(tokens) < seq_len:
        raise ValueError(f"tokens holds {len(tokens)} tokens, fewer than one sequence of seq_len={seq_len}")
    return vocab


def write_topk_shards(
    hidden_fn: HiddenFn,
    lm_head_weight: Tensor,  # (Vt, H)
    tokens: np.ndarray,  # (num_tokens,) integer, e.g. a numpy.memmap
    out_dir: str | os.PathLike,
    *,
    k: int,
    seq_len: int,
    batch_size: int,
    sequences_per_shard: int,
    temperature: float = 1.0,
    dtype: LogprobDtype = "float16",
    resume: bool = True,
    progress: Callable[[int, int], None] | None = None,
    lm_head_bias: Tensor | None = None,  # (Vt,)
    softcap: float | None = None,
    vocab: int | None = None,
    chunk_size: int | Literal["auto"] = "auto",
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the teacher over ``tokens`` and cache its top-k log-probs as shards in ``out_dir``.

    Streams: only one shard's sequences (read from ``tokens`` as needed, so a memmap is never
    loaded whole) and results are in host memory at a time; top-k comes from
    :func:`kdfuse.topk.teacher_topk`, so the full logits never exist either.

    Args:
        hidden_fn: the teacher's trunk, ``input_ids (B, T) int64 -> hidden (B, T, H)``; called
            under ``torch.no_grad`` with ``input_ids`` on ``lm_head_weight``'s device.
        lm_head_weight, lm_head_bias: the teacher's output projection.
        tokens: 1-D integer token array; cut into ``len(tokens) // seq_len`` sequences.
        out_dir: created if missing; see the module docstring for the layout.
        k, temperature, softcap, vocab, chunk_size: as in :func:`teacher_topk`.
        seq_len, batch_size, sequences_per_shard: sequence length, sequences per teacher call,
            sequences per shard file.
        dtype: ``"float16"`` or ``"float32"`` log-probs on disk.
        resume: keep shards already on disk when ``out_dir`` has a manifest of the same
            configuration (a different one is an error). ``False``, or no manifest: delete any
            shard files there and compute every shard.
        progress: called as ``progress(shards_done, num_shards)`` after each shard, skipped or
            written.
        metadata: JSON-serialisable facts recorded in the manifest (e.g. the teacher's name);
            part of the configuration a resume must match, as JSON reads it back (tuples as lists).

    Returns:
        The manifest, as written to ``out_dir/manifest.json``.
    """
    tokens = np.asarray(tokens)  # a view (no copy) of a memmap
    vocab = _check_write_args(tokens, lm_head_weight, k, seq_len, batch_size, sequences_per_shard, dtype, vocab)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _plan(
        tokens,
        k=k,
        seq_len=seq_len,
        sequences_per_shard=sequences_per_shard,
        temperature=temperature,
        softcap=softcap,
        vocab=vocab,
        dtype=dtype,
        metadata=metadata or {},
    )
    # Shards on disk are reused only under a manifest of the same configuration; anything else
    # goes first, so a crash of this run can never leave old shards under the new manifest.
    reuse = resume and (out_dir / MANIFEST).exists()
    if reuse:
        _check_resumable(_read_manifest(out_dir), manifest, out_dir)
    _remove(out_dir, _TEMPORARY) if reuse else _remove(out_dir, _SHARD_FILE, _TEMPORARY)
    _write_manifest(out_dir, manifest)

    shards = manifest["shards"]
    options = dict(
        k=k,
        batch_size=batch_size,
        temperature=temperature,
        softcap=softcap,
        vocab=vocab,
        chunk_size=chunk_size,
        dtype=dtype,
    )
    for index, shard in enumerate(shards):
        path = out_dir / shard["file"]
        if not (reuse and path.exists()):
            start = index * sequences_per_shard
            sequences = np.asarray(tokens[start * seq_len : (start + shard["sequences"]) * seq_len])
            sequences = sequences.reshape(shard["sequences"], seq_len)
            ids, logprobs = _shard_arrays(hidden_fn, lm_head_weight, lm_head_bias, sequences, **options)
            write_atomic(path, functools.partial(np.savez, tokens=sequences, ids=ids, logprobs=logprobs))
        if progress is not None:
            progress(index + 1, len(shards))

    manifest["complete"] = True
    _write_manifest(out_dir, manifest)
    return manifest


def _validate_manifest(manifest: Mapping[str, Any], out_dir: Path) -> None:
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{out_dir / MANIFEST} is not a {FORMAT} v{VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    if not manifest.get("complete"):
        raise ValueError(f"{out_dir} is incomplete (writing stopped early): rerun write_topk_shards to resume")
    counts = [shard["sequences"] for shard in manifest["shards"]]
    if sum(counts) != manifest["num_sequences"] or any(n != manifest["sequences_per_shard"] for n in counts[:-1]):
        raise ValueError(
            f"{out_dir / MANIFEST}: shard sizes {counts} do not add up to num_sequences="
            f"{manifest['num_sequences']} in shards of {manifest['sequences_per_shard']}"
        )


class TopkShards(torch.utils.data.Dataset):
    """The sequences of a directory written by :func:`write_topk_shards`.

    ``len`` is the number of sequences; item ``i`` is ``dict(input_ids (T,) int64,
    topk_ids (T, k) int64, topk_logprobs (T, k) float32)``. Shards are read lazily and at most
    one shard's arrays stay cached (per process: each DataLoader worker has its own), so an
    order that walks shard by shard (e.g. shuffling within shards) reads each file once.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.manifest = _read_manifest(self.out_dir)
        _validate_manifest(self.manifest, self.out_dir)
        self.k: int = self.manifest["k"]
        self.seq_len: int = self.manifest["seq_len"]
        self._per_shard: int = self.manifest["sequences_per_shard"]
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.manifest["num_sequences"]

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if self._cached is None or self._cached[0] != index:
            self._cached = None  # drop the old arrays before reading the new ones
            self._cached = (index, self._load(index))
        return self._cached[1]

    def _load(self, index: int) -> dict[str, np.ndarray]:
        shard = self.manifest["shards"][index]
        path = self.out_dir / shard["file"]
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in ("tokens", "ids", "logprobs")}
        expected = {
            "tokens": (shard["sequences"], self.seq_len),
            "ids": (shard["sequences"], self.seq_len, self.k),
            "logprobs": (shard["sequences"], self.seq_len, self.k),
        }
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ValueError(f"{path}: {name} has shape {arrays[name].shape}, manifest implies {shape}")
        return arrays

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} sequences")
        shard_index, row = divmod(i % n, self._per_shard)
        arrays = self._shard(shard_index)
        return {
            "input_ids": torch.from_numpy(arrays["tokens"][row].astype(np.int64)),
            "topk_ids": torch.from_numpy(arrays["ids"][row].astype(np.int64)),
            "topk_logprobs": torch.from_numpy(arrays["logprobs"][row].astype(np.float32)),
        }

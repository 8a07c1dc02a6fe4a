"""Cache a Hugging Face teacher's top-k log-probs over a token file, as kdfuse top-k shards.

    python tools/topk_shards.py --tokens train.bin --token-dtype uint16 --out shards/ \\
        --hf-model meta-llama/Llama-3.1-8B --k 64 --seq-len 2048 --batch-size 8

The token file is a flat array of token ids (nanoGPT-style ``.bin``), read through a memmap. The
teacher's logits are ``lm_head(trunk(input_ids))``, soft-capped when the model's config has
``final_logit_softcapping`` (Gemma-2); models whose forward scales or otherwise post-processes
logits beyond that are not supported. Rerunning with the same arguments resumes where a
previous run stopped. See :mod:`kdfuse.shards` for the output layout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdfuse.shards import HiddenFn, write_topk_shards

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", required=True, type=Path, help="flat binary file of token ids")
    parser.add_argument("--token-dtype", choices=("uint16", "uint32"), default="uint16")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created; resumed if present)")
    parser.add_argument("--hf-model", required=True, help="Hugging Face model name or local path")
    parser.add_argument("--k", type=int, default=64, help="top-k tokens kept per position")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward")
    parser.add_argument("--sequences-per-shard", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="teacher temperature")
    parser.add_argument("--logprob-dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--model-dtype", choices=tuple(_TORCH_DTYPES), default="bfloat16")
    parser.add_argument("--vocab", type=int, default=None, help="keep the first VOCAB logits (padded embeddings)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-resume", action="store_true", help="recompute every shard")
    return parser.parse_args(argv)


def load_hf_teacher(name: str, device: str, dtype: torch.dtype) -> tuple[HiddenFn, torch.Tensor, float | None]:
    """(hidden_fn, lm_head weight, softcap) of a Hugging Face causal LM, in eval mode on ``device``.

    The trunk is ``model.base_model`` (``model.model`` for Llama-style models) and the head
    ``model.get_output_embeddings()`` (``model.lm_head``), so tied embeddings work too.
    """
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SystemExit("tools/topk_shards.py needs transformers>=4.56: pip install 'transformers>=4.56'") from e
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise SystemExit(f"{name}: lm_head has a bias, which this tool does not pass on")
    trunk = model.base_model

    def hidden_fn(input_ids: torch.Tensor) -> torch.Tensor:
        return trunk(input_ids=input_ids, use_cache=False).last_hidden_state

    return hidden_fn, head.weight, getattr(model.config, "final_logit_softcapping", None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tokens = np.memmap(args.tokens, dtype=args.token_dtype, mode="r")
    hidden_fn, weight, softcap = load_hf_teacher(args.hf_model, args.device, _TORCH_DTYPES[args.model_dtype])

    def progress(done: int, total: int) -> None:
        print(f"shard {done}/{total}", file=sys.stderr, flush=True)

    manifest = write_topk_shards(
        hidden_fn,
        weight,
        tokens,
        args.out,
        k=args.k,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        sequences_per_shard=args.sequences_per_shard,
        temperature=args.temperature,
        dtype=args.logprob_dtype,
        resume=not args.no_resume,
        progress=progress,
        softcap=softcap,
        vocab=args.vocab,
        metadata={"teacher": args.hf_model, "model_dtype": args.model_dtype, "tokens": str(args.tokens.resolve())},
    )
    print(f"{manifest['num_sequences']} sequences in {len(manifest['shards'])} shards under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

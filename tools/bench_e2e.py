"""Whole-distillation-step benchmark: real-sized Hugging Face teacher/student pairs, each KD loss inside a full step.

One step is what a training loop runs: the teacher's forward under ``torch.no_grad``, the
student's forward and backward, and a fused AdamW update of the student (bf16 weights and, as
``torch.optim.AdamW`` keeps them for bf16 weights, bf16 moments; the same for every contender).
The models are ``transformers`` models built from their configs (written out below, no
downloads) with random bf16 weights and ``attn_implementation="sdpa"``:

    llama   Llama-3.1-8B teacher → Llama-3.2-1B student (tied embeddings), V = 128256 for both
    qwen    Qwen2.5-7B teacher (V = 152064) → Qwen2.5-0.5B student (tied, V = 151936); the
            teacher's padded vocabulary is cut to the student's first 151936 entries, as
            kdfuse.hf does (TRL's GKD loss would fail on the mismatch; Liger would zero-pad the
            student's logits instead, a different loss)

Contenders, each a function ``loss(student, teacher, ids) -> scalar`` inside the same step:

    no-loss          the floor: teacher forward, student forward and a zero loss on the student's
                     last hidden state (the whole backward runs, with zero gradients)
    gkd-full-logits  both models' full logits (``model(ids).logits``, bf16) into TRL 1.16's GKD
                     ``GKDTrainer.generalized_jsd_loss``, as GKDTrainer.compute_loss calls it
    trl-chunked      TRL 1.16's DistillationTrainer kernel ``_chunked_divergence_loss`` on the last
                     hidden states and lm_head weights, called as the trainer calls it (completion
                     mask, beta, temperature, num_items_in_batch); Triton on CUDA, its torch
                     fallback on a CPU
    liger-chunked    Liger-Kernel's ``LigerFusedLinearJSDLoss`` (soft loss only) on the flattened
                     hidden states; torch.compile'd on CUDA, eager on a CPU
    kdfuse           ``kdfuse.hf.distill``
    kdfuse-fp32      ``kdfuse.hf.distill(..., fp32_logits=True)`` (skipped where kdfuse does not
                     take ``fp32_logits``)
    no-loss-student  the student alone (forward, zero loss, backward): the floor of kdfuse-topk64
    kdfuse-topk64    (forward KL only) the student against the teacher's top-64 log-probs, written
                     beforehand with kdfuse.shards.write_topk_shards and read back with
                     TopkShards, as tools/topk_shards.py does; the step runs no teacher. Its loss
                     is another loss (``topk_forward_kl_bucket``: the top-64 and one tail bucket)

Divergences (soft only, temperature 1, TRL's and Liger's β convention, which kdfuse follows):
``fkl`` forward KL(teacher‖student) (β = 0) and ``jsd`` the generalized JSD with β = 0.5.

Per contender the table gives the median step time (timed in interleaved rounds with
autotune.measure_interleaved after untimed warm-up steps), tokens per second, the steady-state
peak memory (``max_memory_allocated`` over one step, everything resident included), the first
step's peak and seconds (its loss and backward, before any update, so that every contender's
loss is taken at the same weights; they include compilation, and kdfuse's in-process chunk-size
tuning, which a fresh tuning cache makes it do: see ``--keep-tuning-cache``), the loss's share of
the step ((step − floor) / step), and the loss itself against a float64 reference on the same
batch and weights (see LOSS_RTOL; the exit status is 1 where one disagrees). Random models have
nearly symmetric divergences (forward and reverse KL of two random logit vectors are about
equal), so the agreement catches scale and normalisation mistakes, not a flipped direction.

``--max-fit`` instead searches each contender's largest step, in ``--seq``-token sequences:
batches doubling from 1 up to ``--max-batch``, then bisected, a step that runs out of memory
being the end (``fit_trial``). kdfuse uses its heuristic chunk size there (``--fit-autotune``:
tuned at every size), and the steps that run no teacher (no-loss-student, kdfuse-topk64) go last,
with the teacher moved to the host, as an offline top-k pipeline has no teacher on the GPU.

    python tools/bench_e2e.py --json e2e.json --png e2e.png           # both pairs, both divergences
    python tools/bench_e2e.py --max-fit --pairs llama --divergences fkl
    python tools/bench_e2e.py --device cpu --tiny                      # CPU smoke run, tiny models
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdfuse
import kdfuse.hf
from autotune import measure_interleaved
from kdfuse import divergences as D
from kdfuse.shards import TopkShards, write_topk_shards

GiB = 2**30

# Every contender's loss is compared with a float64 reference computed from the same bf16
# hidden states and weights, within a relative tolerance. 1e-3 for float32 loss math (TRL's
# kernel, kdfuse): bf16 logits move the loss by ~1e-5 to 1e-4. 5e-2 for the losses computed in
# bf16: TRL's GKD loss (its log-softmaxes, KL terms and result are bf16 tensors, and the
# result's spacing alone is 2^-7 relative) and Liger's soft loss (bf16 log-softmaxes, each
# chunk summed into a bf16 scalar). Where a bf16 log-softmax rounds a row's log-sum-exp once
# (PyTorch's CPU kernel does), every log-prob of the row shifts together by up to 2^-5 nats,
# an error the sum over the vocabulary does not average out: measured 1.3e-2 on a JSD of 64
# rows of random logits (its value, ~0.2, is small). A convention mistake (β flipped, the
# temperature, the normalizer) moves the loss by far more.
LOSS_RTOL = 1e-3
LOSS_RTOL_BF16_MATH = 5e-2
BF16_MATH = {"gkd-full-logits", "liger-chunked"}
TOPK = 64
TOPK_DIVERGENCE = "topk_forward_kl_bucket"
REFERENCE_ROWS = 256  # rows per block of the float64 reference: a few (rows, V) float64 tensors

Model = nn.Module
LossFn = Callable[[Model, Model, Tensor], Tensor]

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

# The published configs (config.json on the Hugging Face Hub) of each model, the fields that
# shape the computation. rope: the parameters of the rotary embedding.
LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
LLAMA_32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    use_sliding_window=False,
    rope=dict(rope_type="default", rope_theta=1000000.0),
)
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    rope=dict(rope_type="default", rope_theta=1000000.0),
)


@dataclass(frozen=True)
class Pair:
    name: str
    model_class: str  # a transformers *ForCausalLM class
    config_class: str
    teacher: dict
    student: dict


PAIRS = {
    "llama": Pair("Llama-3.1-8B → Llama-3.2-1B", "LlamaForCausalLM", "LlamaConfig", LLAMA_31_8B, LLAMA_32_1B),
    "qwen": Pair("Qwen2.5-7B → Qwen2.5-0.5B", "Qwen2ForCausalLM", "Qwen2Config", QWEN25_7B, QWEN25_05B),
}

# --tiny: the same model classes at toy sizes (the teacher twice the student's width), so that
# every code path runs on a CPU in seconds; the Qwen teacher keeps a larger vocabulary.
TINY_SEQ = 64
_TINY_TEACHER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_TINY_STUDENT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny(config: dict, sizes: dict, vocab: int) -> dict:
    """``config`` shrunk to ``sizes`` and ``vocab`` (2 KV heads, the head width that follows),
    its weights drawn wider so that its logits spread as the full model's do (the final norm
    leaves unit-RMS hidden states, so a logit's spread is initializer_range · √hidden): the
    divergences then have the full models' size, not that of two near-uniform distributions."""
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    spread = 0.02 * math.sqrt(config["hidden_size"] / sizes["hidden_size"])  # 0.02: transformers' default
    out = {**config, **sizes, "vocab_size": vocab, "num_key_value_heads": 2, "initializer_range": spread}
    return {**out, "head_dim": head_dim} if "head_dim" in config else out


def tiny_pair(pair: Pair) -> Pair:
    teacher_vocab = 1000 if pair.teacher["vocab_size"] == pair.student["vocab_size"] else 1024
    return Pair(
        pair.name + " (tiny)",
        pair.model_class,
        pair.config_class,
        tiny(pair.teacher, _TINY_TEACHER, teacher_vocab),
        tiny(pair.student, _TINY_STUDENT, 1000),
    )


def with_layers(pair: Pair, layers: int) -> Pair:
    """``pair`` with ``layers`` layers in each model, every width kept (--layers)."""
    return Pair(
        f"{pair.name} ({layers} layers)",
        pair.model_class,
        pair.config_class,
        {**pair.teacher, "num_hidden_layers": layers},
        {**pair.student, "num_hidden_layers": layers},
    )


def make_config(config_class: type, spec: dict) -> Any:
    """A transformers config from ``spec``; rope parameters as ``rope_parameters`` (transformers 5)
    or, for older versions, as ``rope_theta`` and ``rope_scaling``."""
    spec = dict(spec)
    rope = spec.pop("rope")
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:
        return config_class(**spec, rope_parameters=rope)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config_class(**spec, rope_theta=rope["rope_theta"], rope_scaling=None if len(scaling) == 1 else scaling)


def build_model(pair: Pair, spec: dict, device: torch.device, seed: int) -> Model:
    """A randomly initialised bf16 model, built on ``device`` (an 8B model never exists on the host)."""
    import transformers

    config = make_config(getattr(transformers, pair.config_class), spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, pair.model_class)._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.to(device)


def parameter_count(model: Model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter: counted once


# --------------------------------------------------------------------------------------------
# Divergences and contenders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    name: str
    kdfuse: str  # kdfuse's name for it
    beta: float  # TRL's and Liger's generalized-JSD β giving the same loss (0: forward KL)


DIVERGENCES = {
    "fkl": Divergence("forward KL", "forward_kl", 0.0),
    "jsd": Divergence("JSD β=0.5", "jsd_beta0.5", 0.5),
}

CONTENDERS = (
    "no-loss",
    "gkd-full-logits",
    "trl-chunked",
    "liger-chunked",
    "kdfuse",
    "kdfuse-fp32",
    "no-loss-student",
    "kdfuse-topk64",
)
FLOORS = {"no-loss", "no-loss-student"}
FLOOR_OF = {"kdfuse-topk64": "no-loss-student"}  # every other contender's floor is no-loss
NOT_THE_LOSS = {*FLOORS, "kdfuse-topk64"}  # left out of the loss agreement


def hidden(model: Model, ids: Tensor) -> Tensor:
    """The model's last hidden states at positions 0 .. T − 2 (each predicts the next token)."""
    return kdfuse.hf.last_hidden_state(model, ids)[:, :-1]


def head_weight(model: Model) -> Tensor:
    return model.get_output_embeddings().weight


def vocab_of(student: Model) -> int:
    return head_weight(student).shape[0]


def no_loss(student: Model, teacher: Model | None, ids: Tensor) -> Tensor:
    """A zero that depends on the student's last hidden state: its backward is the whole
    student's backward, with no loss computed (``teacher`` None: the teacher is not run)."""
    if teacher is not None:
        with torch.no_grad():
            hidden(teacher, ids)
    return hidden(student, ids).float().square().mean() * 0


def student_only_no_loss(student: Model, teacher: Model | None, ids: Tensor) -> Tensor:
    return no_loss(student, None, ids)


def gkd_full_logits(student: Model, teacher: Model, ids: Tensor, *, jsd: Callable, beta: float, T: float) -> Tensor:
    """GKDTrainer.compute_loss: both models' logits, shifted; labels only mask."""
    student_logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1, : student_logits.shape[-1]]
    return jsd(student_logits, teacher_logits, labels=ids[:, 1:], beta=beta, temperature=T)


def trl_chunked(student: Model, teacher: Model, ids: Tensor, *, kernel: Callable, beta: float, T: float) -> Tensor:
    """DistillationTrainer._compute_loss: hidden states, lm_heads, the completion mask (every
    position counts here) and num_items_in_batch as the trainer computes it in training."""
    student_hidden = hidden(student, ids)
    with torch.no_grad():
        teacher_hidden = hidden(teacher, ids)
    mask = torch.ones_like(ids[:, 1:])
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    # The kernel walks the student's vocabulary and slices the teacher's weight to it, so a
    # larger (padded) teacher vocabulary is cut as kdfuse cuts it; the trainer passes it whole.
    loss, _entropy, _count = kernel(
        student_hidden,
        teacher_hidden,
        s_head.weight,
        t_head.weight,
        mask,
        beta,
        num_items_in_batch=mask.sum().float().clamp(min=1.0),
        student_lm_head_bias=s_head.bias,
        teacher_lm_head_bias=t_head.bias,
        temperature=T,
    )
    return loss


def liger_chunked(student: Model, teacher: Model, ids: Tensor, *, module: nn.Module) -> Tensor:
    """LigerFusedLinearJSDLoss on (N, H) rows; labels only mask (its hard weight is 0)."""
    student_hidden = hidden(student, ids)
    with torch.no_grad():
        teacher_hidden = hidden(teacher, ids)
    vocab = vocab_of(student)
    return module(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        head_weight(student),
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        head_weight(teacher)[:vocab],  # cut, not Liger's zero-padding of the student (see the top)
        ids[:, 1:].reshape(-1),
    )


def kdfuse_hf(student: Model, teacher: Model, ids: Tensor, **options: Any) -> Tensor:
    return kdfuse.hf.distill(student, teacher, ids, **options)


def kdfuse_topk(student: Model, teacher: Model | None, ids: Tensor, *, topk: Callable, T: float) -> Tensor:
    """The student alone against the teacher's stored top-k (``topk(ids)``: (ids, logprobs))."""
    student_hidden = hidden(student, ids)
    return kdfuse.fused_linear_distill(
        student_hidden,
        head_weight(student),
        teacher_topk=topk(ids),
        labels=ids[:, 1:],
        divergence=TOPK_DIVERGENCE,
        temperature=T,
    )


@dataclass
class Context:
    """What the contenders of one pair share."""

    device: torch.device
    temperature: float
    liger_chunk: int
    topk: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None  # ids -> the stored top-k


def trl_gkd_loss() -> Callable:
    """TRL 1.16's GKD loss (raises if trl or one of its imports, datasets above all, is missing)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we know GKD lives in trl.experimental
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def trl_kernel() -> Callable:
    """TRL 1.16's DistillationTrainer loss, as the trainer looks it up."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    return _chunked_divergence_loss


def liger_module(div: Divergence, ctx: Context) -> nn.Module:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=div.beta,
        temperature=ctx.temperature,
        compiled=ctx.device.type == "cuda",  # torch.compile on a CPU would cost more than it saves
        chunk_size=ctx.liger_chunk,
    )


def import_failure(exc: BaseException) -> str:
    return f"not importable here ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"


def make_contenders(div: Divergence, ctx: Context, wanted: list[str]) -> tuple[dict[str, LossFn], dict[str, str]]:
    """({name: loss function}, {name: why skipped}) of the ``wanted`` contenders for ``div``."""
    T = ctx.temperature
    out: dict[str, LossFn] = {}
    skipped: dict[str, str] = {}
    out["no-loss"] = no_loss
    # A library that does not import here is a skip, not the end of the run.
    try:
        out["gkd-full-logits"] = functools.partial(gkd_full_logits, jsd=trl_gkd_loss(), beta=div.beta, T=T)
    except Exception as exc:
        skipped["gkd-full-logits"] = "trl.experimental.gkd " + import_failure(exc)
    try:
        out["trl-chunked"] = functools.partial(trl_chunked, kernel=trl_kernel(), beta=div.beta, T=T)
    except Exception as exc:
        skipped["trl-chunked"] = "trl.trainer.distillation_trainer " + import_failure(exc)
    try:
        out["liger-chunked"] = functools.partial(liger_chunked, module=liger_module(div, ctx))
    except Exception as exc:
        skipped["liger-chunked"] = "liger_kernel " + import_failure(exc)
    out["kdfuse"] = functools.partial(kdfuse_hf, divergence=div.kdfuse, temperature=T)
    if "fp32_logits" in inspect.signature(kdfuse.fused_linear_distill).parameters:
        out["kdfuse-fp32"] = functools.partial(kdfuse_hf, divergence=div.kdfuse, temperature=T, fp32_logits=True)
    else:
        skipped["kdfuse-fp32"] = "kdfuse.fused_linear_distill takes no fp32_logits in this checkout"
    if div.beta == 0.0:  # the sparse teacher: forward KL only
        out["no-loss-student"] = student_only_no_loss
        if ctx.topk is not None:
            out["kdfuse-topk64"] = functools.partial(kdfuse_topk, topk=ctx.topk, T=T)
    out = {name: fn for name, fn in out.items() if name in wanted}
    return out, {name: why for name, why in skipped.items() if name in wanted}


# --------------------------------------------------------------------------------------------
# The teacher's top-k, through shards on disk
# --------------------------------------------------------------------------------------------


class StoredTopk:
    """The teacher's top-k of a fixed token stream, written as kdfuse shards (the offline step,
    before any timing) and read back with TopkShards onto the device; ``self(ids)`` is the
    (ids, logprobs) of the batch ``ids``, shifted like the hidden states."""

    def __init__(self, teacher: Model, tokens: Tensor, vocab: int, out_dir: Path, device: torch.device) -> None:
        batch, seq = tokens.shape

        def trunk(input_ids: Tensor) -> Tensor:
            return kdfuse.hf.last_hidden_state(teacher, input_ids)

        write_topk_shards(
            trunk,
            head_weight(teacher),
            tokens.reshape(-1).cpu().numpy().astype(np.int64),
            out_dir,
            k=TOPK,
            seq_len=seq,
            batch_size=1,  # one sequence per teacher forward: its activations stay small
            sequences_per_shard=batch,
            vocab=vocab,
        )
        shards = TopkShards(out_dir)
        items = [shards[i] for i in range(len(shards))]
        stored = torch.stack([item["input_ids"] for item in items])
        if not torch.equal(stored, tokens.cpu()):
            raise RuntimeError("the shards hold other tokens than the ones written")
        self.tokens = tokens
        self.ids = torch.stack([item["topk_ids"] for item in items])[:, :-1].contiguous().to(device)
        self.logprobs = torch.stack([item["topk_logprobs"] for item in items])[:, :-1].contiguous().to(device)

    def __call__(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        # Checked by storage, not by value: comparing the tokens would wait for the GPU every step.
        batch = ids.shape[0]
        if ids.data_ptr() != self.tokens.data_ptr() or batch > self.tokens.shape[0]:
            raise ValueError("the stored top-k is of another batch")
        return self.ids[:batch], self.logprobs[:batch]


# --------------------------------------------------------------------------------------------
# Steps, the reference, memory
# --------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """The student, the frozen teacher and the student's optimizer."""

    student: Model
    teacher: Model
    optimizer: torch.optim.Optimizer
    device: torch.device

    def step(self, loss_fn: LossFn, ids: Tensor) -> None:
        loss = loss_fn(self.student, self.teacher, ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_trainer(student: Model, teacher: Model, device: torch.device, lr: float, grad_ckpt: bool) -> Trainer:
    teacher.eval().requires_grad_(False)
    student.train()
    if grad_ckpt:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, fused=True if device.type == "cuda" else None)
    return Trainer(student, teacher, optimizer, device)


def create_optimizer_state(trainer: Trainer, ids: Tensor) -> None:
    """One no-loss step: AdamW creates its moments, so that no contender's first step pays for
    them. Its gradients are zero, so the weights move only by the decay lr·wd (1e-7 of each
    weight at the defaults, below bf16's resolution)."""
    trainer.step(no_loss, ids)
    trainer.sync()


def is_oom(exc: BaseException) -> bool:
    """Out of device memory, also where a library reports it as a plain RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else math.nan


@torch.no_grad()
def reference_loss(trainer: Trainer, ids: Tensor, div: Divergence, temperature: float) -> float:
    """The mean divergence over the batch's positions with float64 logits from the models'
    bf16 hidden states and weights, REFERENCE_ROWS rows at a time."""
    student_hidden = hidden(trainer.student, ids).flatten(0, 1)
    teacher_hidden = hidden(trainer.teacher, ids).flatten(0, 1)
    vocab = vocab_of(trainer.student)
    ws = head_weight(trainer.student).double()
    wt = head_weight(trainer.teacher)[:vocab].double()
    fn = D.get(div.kdfuse)
    total = torch.zeros((), dtype=torch.float64, device=ws.device)
    for start in range(0, student_hidden.shape[0], REFERENCE_ROWS):
        rows = slice(start, start + REFERENCE_ROWS)
        s = student_hidden[rows].double() @ ws.t()
        t = teacher_hidden[rows].double() @ wt.t()
        total += fn(s / temperature, t / temperature).sum()
    return total.item() / student_hidden.shape[0]


@dataclass
class Memory:
    """What one pair keeps resident, and what a full-logits loss adds per sequence."""

    teacher_params: int
    student_params: int
    vocab: int
    seq: int
    measured_gib: float = math.nan  # allocated after the first update, between steps

    @property
    def expected_gib(self) -> float:
        """bf16 teacher weights; bf16 student weights and AdamW's two moments (torch keeps a
        bf16 weight's moments in bf16)."""
        return (self.teacher_params * 2 + self.student_params * 6) / GiB

    @property
    def gradients_gib(self) -> float:
        return self.student_params * 2 / GiB

    @property
    def logits_gib(self) -> float:
        return self.seq * self.vocab * 2 / GiB  # one (T, V) bf16 tensor

    def describe(self) -> str:
        measured = "" if math.isnan(self.measured_gib) else f" (measured: {self.measured_gib:.1f} GiB)"
        return (
            f"  teacher {self.teacher_params / 1e9:.2f} B params (bf16, frozen), student "
            f"{self.student_params / 1e9:.2f} B params (bf16, AdamW's moments bf16):\n"
            f"  resident between steps {self.expected_gib:.1f} GiB{measured}; during a step add the student's "
            f"gradients ({self.gradients_gib:.1f} GiB) and activations\n"
            f"  one ({self.seq}, {self.vocab}) bf16 logits tensor: {self.logits_gib:.2f} GiB per sequence; a "
            "full-logits loss holds several (both models' logits and log-softmaxes, the KL terms, the gradient)"
        )


# --------------------------------------------------------------------------------------------
# The table: first steps, agreement, timing
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    pair: str
    divergence: str
    contender: str
    batch: int
    seq: int
    step_ms: float = math.nan
    tokens_per_s: float = math.nan
    loss_share: float = math.nan
    peak_gib: float = math.nan
    first_peak_gib: float = math.nan
    first_step_s: float = math.nan
    loss: float = math.nan
    reference: float = math.nan
    loss_rel_err: float = math.nan
    agrees: bool | None = None  # None: not compared (a floor, another loss, or it did not run)
    max_tokens: int = 0  # --max-fit: the most tokens per step that ran
    max_capped: bool = False  # --max-fit: the search stopped at --max-batch, not at a failure
    note: str = ""


def failure(exc: BaseException) -> str:
    return "OOM" if is_oom(exc) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def first_step(trainer: Trainer, fn: LossFn, ids: Tensor, row: Row) -> None:
    """The contender's first loss and backward (no update: every contender's loss is taken at
    the same weights), with its time and peak memory; a failure is noted in ``row``."""
    trainer.sync()
    peak_reset(trainer.device)
    start = time.perf_counter()
    try:
        row.loss = loss_and_backward(trainer, fn, ids)
        row.first_step_s = time.perf_counter() - start
        row.first_peak_gib = peak_gib(trainer.device)
    except Exception as exc:  # a contender failing (OOM above all) is a result, not the end of the run
        row.note = failure(exc)
    # Freed here, outside the except clause, whose traceback holds the step's tensors.
    trainer.optimizer.zero_grad(set_to_none=True)
    free_memory(trainer.device)


def loss_and_backward(trainer: Trainer, fn: LossFn, ids: Tensor) -> float:
    """The loss's value, after its backward (the graph goes with this frame)."""
    loss = fn(trainer.student, trainer.teacher, ids)
    value = loss.item()
    loss.backward()
    trainer.sync()
    return value


def tolerance(contender: str) -> float:
    """The relative tolerance of the contender's loss (see LOSS_RTOL)."""
    return LOSS_RTOL_BF16_MATH if contender in BF16_MATH else LOSS_RTOL


def check_agreement(row: Row, reference: float) -> None:
    row.reference = reference
    if row.contender in NOT_THE_LOSS or not math.isfinite(row.loss):
        return
    row.loss_rel_err = abs(row.loss - reference) / abs(reference)
    row.agrees = row.loss_rel_err <= tolerance(row.contender)


def time_steps(trainer: Trainer, fns: dict[str, LossFn], ids: Tensor, args) -> dict[str, tuple[float, str]]:
    """{name: (median step ms, note)}: all in interleaved rounds, or one at a time when that
    runs out of memory (a contender that fits alone is still timed)."""
    steps = {name: functools.partial(trainer.step, fn, ids) for name, fn in fns.items()}
    timing = functools.partial(
        measure_interleaved,
        rounds=args.rounds,
        warmup=args.warmup,
        repeat=args.repeat,
        device=trainer.device,
        settle=args.settle,
    )
    try:
        return {name: (ms, "") for name, (ms, _peak) in timing(steps).items()}
    except Exception as exc:  # whichever contender failed, the others are still timed
        print(f"  the timing rounds failed ({failure(exc)}): timing each contender alone")
    trainer.optimizer.zero_grad(set_to_none=True)
    free_memory(trainer.device)
    out = {}
    for name, step in steps.items():
        try:
            out[name] = (timing({name: step})[name][0], "timed alone (the rounds failed)")
        except Exception as exc:
            out[name] = (math.nan, failure(exc))
        trainer.optimizer.zero_grad(set_to_none=True)
        free_memory(trainer.device)
    return out


def steady_peak(trainer: Trainer, fn: LossFn, ids: Tensor) -> float:
    """The peak memory (GiB, everything resident included) of one more step, after timing;
    NaN if that step fails."""
    ran, peak, _error = fit_trial(trainer, fn, ids, steps=1)
    return peak if ran else math.nan


def fill_shares(rows: list[Row]) -> None:
    """Each contender's loss share, (step − its floor's step) / step."""
    by_name = {r.contender: r for r in rows}
    for r in rows:
        floor = by_name.get(FLOOR_OF.get(r.contender, "no-loss"))
        if floor is not None and r.contender not in FLOORS:
            r.loss_share = (r.step_ms - floor.step_ms) / r.step_ms


def table_rows(trainer: Trainer, pair: str, div_key: str, ctx: Context, ids: Tensor, args) -> list[Row]:
    """One (pair, divergence): first steps and losses, then the timing, then steady peaks."""
    div = DIVERGENCES[div_key]
    fns, skipped = make_contenders(div, ctx, args.contenders)
    batch, seq = ids.shape
    reference = reference_loss(trainer, ids, div, ctx.temperature)
    free_memory(trainer.device)  # the reference's float64 weights leave no cached blocks behind
    rows = []
    for name, fn in fns.items():
        row = Row(pair, div_key, name, batch, seq)
        first_step(trainer, fn, ids, row)
        check_agreement(row, reference)
        print(
            f"  {pair} {div_key} {name}: first step {row.first_step_s:.1f} s, loss {row.loss:.6g} {row.note}",
            flush=True,
        )
        rows.append(row)
    ran = {r.contender: fns[r.contender] for r in rows if not r.note}
    for name, (ms, note) in time_steps(trainer, ran, ids, args).items():
        row = next(r for r in rows if r.contender == name)
        row.step_ms, row.note = ms, note
        row.tokens_per_s = batch * seq / (ms / 1e3)
        if math.isfinite(ms):
            row.peak_gib = steady_peak(trainer, fns[name], ids)
    fill_shares(rows)
    for name, why in skipped.items():
        rows.append(Row(pair, div_key, name, batch, seq, note="skipped: " + why))
    for r in rows:
        if r.contender == "kdfuse-topk64":
            r.note = (r.note + f" another loss ({TOPK_DIVERGENCE}); its peak includes the unused teacher").strip()
    return rows


# --------------------------------------------------------------------------------------------
# --max-fit
# --------------------------------------------------------------------------------------------


def largest_fitting(fits: Callable[[int], bool], limit: int, resolution: float) -> tuple[int, int | None]:
    """``(lo, hi)``: ``lo`` the largest value in [1, ``limit``] found to fit (0 if 1 does not),
    ``hi`` the smallest found not to (None if none failed up to ``limit``). Doubles from 1, then
    bisects until ``hi − lo <= max(1, resolution·lo)``; assumes that whatever fits, less fits too."""
    lo, hi, value = 0, None, 1
    while hi is None and lo < limit:
        value = min(value, limit)
        if fits(value):
            lo, value = value, value * 2
        else:
            hi = value
    while hi is not None and hi - lo > max(1, int(resolution * lo)):
        middle = (lo + hi) // 2
        if fits(middle):
            lo = middle
        else:
            hi = middle
    return lo, hi


def random_tokens(batch: int, seq: int, vocab: int, seed: int, device: torch.device) -> Tensor:
    """The first ``batch`` sequences of one seeded stream: a larger batch extends a smaller one."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


def fit_trial(trainer: Trainer, fn: LossFn, ids: Tensor, steps: int) -> tuple[bool, float, str]:
    """(ran, peak GiB, failure) of ``steps`` steps on ``ids``."""
    peak_reset(trainer.device)
    error = ""
    try:
        for _ in range(steps):
            trainer.step(fn, ids)
        trainer.sync()
    except Exception as exc:
        error = failure(exc)
    # Freed only here, outside the except clause, whose traceback holds the step's tensors.
    trainer.optimizer.zero_grad(set_to_none=True)
    peak = peak_gib(trainer.device)
    free_memory(trainer.device)
    return not error, peak, error


def max_fit_row(trainer: Trainer, pair: str, div_key: str, name: str, fn: LossFn, tokens: Tensor, args) -> Row:
    """The largest batch of ``--seq``-token sequences that one contender's step runs at."""
    seq = tokens.shape[1]
    peaks: dict[int, float] = {}
    errors: dict[int, str] = {}

    def fits(batch: int) -> bool:
        ran, peak, error = fit_trial(trainer, fn, tokens[:batch], args.fit_steps)
        peaks[batch] = peak
        if error:
            errors[batch] = error
        outcome = "ran" if ran else error
        print(f"  {pair} {div_key} {name}: batch {batch} × {seq}: {outcome} (peak {fmt(peak, '.1f')} GiB)", flush=True)
        return ran

    lo, hi = largest_fitting(fits, min(args.max_batch, tokens.shape[0]), args.fit_resolution)
    row = Row(pair, div_key, name, lo, seq, max_tokens=lo * seq, max_capped=hi is None)
    row.peak_gib = peaks.get(lo, math.nan)
    if hi is not None:
        row.note = f"{hi} × {seq}: {errors[hi]}"
        if errors[hi] != "OOM":
            row.note += " (not memory: the search may have stopped early)"
    return row


TEACHER_FREE = ("no-loss-student", "kdfuse-topk64")  # the steps that never run the teacher


def max_fit_rows(trainer: Trainer, pair: str, ctx: Context, tokens: Tensor, args) -> list[Row]:
    """Every contender's largest step; those that run no teacher last, with the teacher moved
    to the host (an offline top-k pipeline has no teacher on the GPU; it does not come back)."""
    rows, teacher_free = [], {}
    for div_key in args.divergences:
        fns, skipped = make_contenders(DIVERGENCES[div_key], ctx, args.contenders)
        for name, fn in fns.items():
            if name in TEACHER_FREE:
                teacher_free[name] = (div_key, fn)
            else:
                rows.append(max_fit_row(trainer, pair, div_key, name, fn, tokens, args))
        rows += [Row(pair, div_key, name, 0, tokens.shape[1], note="skipped: " + why) for name, why in skipped.items()]
    if teacher_free:
        trainer.teacher.to("cpu")
        free_memory(trainer.device)
    for name, (div_key, fn) in teacher_free.items():
        row = max_fit_row(trainer, pair, div_key, name, fn, tokens, args)
        row.note = (row.note + " teacher moved to the host").strip()
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# One pair, output, main
# --------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def build_pair(key: str, args, device: torch.device) -> tuple[Pair, Trainer]:
    """The pair's models and the student's optimizer."""
    pair = tiny_pair(PAIRS[key]) if args.tiny else PAIRS[key]
    if args.layers:
        pair = with_layers(pair, args.layers)
    start = time.perf_counter()
    teacher = build_model(pair, pair.teacher, device, seed=args.seed + 1)
    student = build_model(pair, pair.student, device, seed=args.seed + 2)
    trainer = make_trainer(student, teacher, device, args.lr, args.grad_ckpt)
    print(f"{pair.name}: built in {time.perf_counter() - start:.1f} s", flush=True)
    return pair, trainer


def run_pair(key: str, args, device: torch.device) -> tuple[list[Row], dict]:
    """One pair's rows and memory figures; its models go with this frame."""
    pair, trainer = build_pair(key, args, device)
    vocab = vocab_of(trainer.student)
    batch = args.max_batch if args.max_fit else args.batch
    tokens = random_tokens(batch, args.seq, vocab, args.seed, device)
    create_optimizer_state(trainer, tokens[:1])
    memory = Memory(parameter_count(trainer.teacher), parameter_count(trainer.student), vocab, args.seq)
    if device.type == "cuda":
        memory.measured_gib = torch.cuda.memory_allocated(device) / GiB
    print(memory.describe(), flush=True)
    ctx = Context(device, args.temperature, args.liger_chunk)
    with tempfile.TemporaryDirectory() as shard_dir:
        if "kdfuse-topk64" in args.contenders and "fkl" in args.divergences:
            start = time.perf_counter()
            ctx.topk = StoredTopk(trainer.teacher, tokens, vocab, Path(shard_dir), device)
            print(f"  top-{TOPK} shards of {tokens.shape[0]} sequences written in {time.perf_counter() - start:.1f} s")
    if args.max_fit:
        rows = max_fit_rows(trainer, key, ctx, tokens, args)
    else:
        rows = [r for d in args.divergences for r in table_rows(trainer, key, d, ctx, tokens, args)]
    return rows, {"pair": pair.name, **asdict(memory)}


def fmt(value: float, spec: str) -> str:
    return "-" if not math.isfinite(value) else format(value, spec)


def print_table(rows: list[Row], title: str, max_fit: bool) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=box.MARKDOWN)
    if max_fit:
        cols = ("pair", "div", "contender", "max tokens/step", "batch × seq", "peak GiB", "note")
    else:
        cols = ("pair", "div", "contender", "step ms", "tokens/s", "loss share", "peak GiB", "1st peak GiB")
        cols += ("1st step s", "loss", "rel. err", "agrees", "note")
    for col in cols:
        table.add_column(col, justify="left" if col in ("pair", "div", "contender", "note") else "right")
    for r in rows:
        table.add_row(*(max_fit_cells(r) if max_fit else table_cells(r)))
    Console(width=230).print(table)


def table_cells(r: Row) -> list[str]:
    agrees = "-" if r.agrees is None else ("yes" if r.agrees else "NO")
    return [
        r.pair,
        r.divergence,
        r.contender,
        fmt(r.step_ms, ".1f"),
        fmt(r.tokens_per_s, ",.0f"),
        fmt(100 * r.loss_share, ".1f") + ("%" if math.isfinite(r.loss_share) else ""),
        fmt(r.peak_gib, ".2f"),
        fmt(r.first_peak_gib, ".2f"),
        fmt(r.first_step_s, ".1f"),
        fmt(r.loss, ".6g"),
        fmt(r.loss_rel_err, ".1e"),
        agrees,
        r.note,
    ]


def max_fit_cells(r: Row) -> list[str]:
    tokens = (("≥ " if r.max_capped else "") + f"{r.max_tokens:,}") if r.batch else "-"
    return [r.pair, r.divergence, r.contender, tokens, f"{r.batch} × {r.seq}", fmt(r.peak_gib, ".1f"), r.note]


RIVALS = ("trl-chunked", "gkd-full-logits", "liger-chunked")  # what kdfuse's step is compared with


def comparison_lines(rows: list[Row]) -> list[str]:
    """Per (pair, divergence): kdfuse's steady step as a fraction of each rival's (the issue's
    targets are stated that way) and its steady peak against the lowest rival's."""
    lines = []
    for pair, div in dict.fromkeys((r.pair, r.divergence) for r in rows):
        mine = {r.contender: r for r in rows if (r.pair, r.divergence) == (pair, div)}
        kd = mine.get("kdfuse")
        rivals = [mine[n] for n in RIVALS if n in mine and math.isfinite(mine[n].step_ms)]
        if kd is None or not math.isfinite(kd.step_ms) or not rivals:
            continue
        ratios = ", ".join(f"{kd.step_ms / r.step_ms:.3f}× {r.contender}" for r in rivals)
        line = f"{pair} {div}: kdfuse's step {ratios}"
        peaks = [r for r in rivals if math.isfinite(r.peak_gib)]
        if peaks and math.isfinite(kd.peak_gib):
            low = min(peaks, key=lambda r: r.peak_gib)
            line += f"; peak {kd.peak_gib:.2f} GiB, lowest rival {low.peak_gib:.2f} ({low.contender})"
        lines.append(line)
    return lines


def agreement_summary(rows: list[Row]) -> tuple[bool, str]:
    compared = [r for r in rows if r.agrees is not None]
    if not compared:
        return True, "loss agreement: nothing compared"
    worst = max(compared, key=lambda r: r.loss_rel_err)
    ok = all(r.agrees for r in compared)
    return ok, (
        f"loss vs the float64 reference, relative tolerance {LOSS_RTOL:g} ({LOSS_RTOL_BF16_MATH:g} for "
        f"{', '.join(sorted(BF16_MATH))}: bf16 loss math): "
        f"{'all agree' if ok else 'DISAGREEMENT'}; worst {worst.loss_rel_err:.1e} "
        f"({worst.pair} {worst.divergence} {worst.contender}) over {len(compared)} losses"
    )


# (value, outlined value behind it, title) of each panel of --png
PANELS = {
    False: [("step_ms", None, "step ms"), ("peak_gib", "first_peak_gib", "peak GiB (outline: first step)")],
    True: [("max_tokens", None, "max tokens/step")],
}


def plot(rows: list[Row], path: str, max_fit: bool) -> None:
    """One row of panels per (pair, divergence), a bar per contender (kdfuse's green)."""
    try:
        import matplotlib
    except ImportError:
        print("--png: matplotlib is not installed (pip install 'kdfuse[plot]'); no plot drawn")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.pair, r.divergence) for r in rows})
    panels = PANELS[max_fit]
    fig, axes = plt.subplots(len(groups), len(panels), figsize=(6 * len(panels), 2.8 * len(groups)), squeeze=False)
    for i, (pair, div) in enumerate(groups):
        sel = [r for r in rows if (r.pair, r.divergence) == (pair, div)]
        for j, (attr, outline, title) in enumerate(panels):
            bars(axes[i, j], sel, attr, outline)
            axes[i, j].set_title(f"{pair} {div}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bars(ax: Any, rows: list[Row], attr: str, outline: str | None) -> None:
    def values(name: str) -> list[float]:
        return [float(getattr(r, name)) if math.isfinite(float(getattr(r, name))) else 0.0 for r in rows]

    names = [r.contender for r in rows]
    if outline is not None:
        ax.barh(names, values(outline), fill=False, edgecolor="k", linewidth=0.8)
    ax.barh(names, values(attr), color=["tab:green" if n.startswith("kdfuse") else "tab:gray" for n in names])
    ax.tick_params(labelsize=7)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]), formatter_class=_Formatter
    )
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=list(DIVERGENCES))
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (the table)")
    parser.add_argument("--seq", type=int, default=None, help=f"tokens per sequence (4096; {TINY_SEQ} with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="toy models of the same classes: a smoke run, CPU included")
    parser.add_argument(
        "--layers", type=int, default=None, help="this many layers in every model, widths kept: a quicker check"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW's learning rate (weight decay: its default)")
    parser.add_argument("--grad-ckpt", action="store_true", help="the student checkpoints its layers (TRL's default)")
    parser.add_argument("--liger-chunk", type=int, default=1024, help="LigerFusedLinearJSDLoss's chunk_size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per contender per round")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all contenders (measure_interleaved)")
    parser.add_argument("--settle", type=float, default=0.0, help="seconds of untimed steps per contender per round")
    parser.add_argument(
        "--keep-tuning-cache",
        action="store_true",
        help="use kdfuse's tuning cache as it is (default: a fresh one, so the first step tunes as a new user's does)",
    )
    parser.add_argument("--max-fit", action="store_true", help="search each contender's largest step instead")
    parser.add_argument("--max-batch", type=int, default=64, help="--max-fit: the largest batch tried")
    parser.add_argument("--fit-steps", type=int, default=1, help="--max-fit: steps per trial")
    parser.add_argument("--fit-resolution", type=float, default=0.125, help="--max-fit: bisect to this fraction")
    parser.add_argument(
        "--fit-autotune",
        action="store_true",
        help="--max-fit: let kdfuse tune its chunk size at every size tried (~10 s each; default: its heuristic)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows, device and memory figures here")
    parser.add_argument("--png", help="draw the results here (needs matplotlib)")
    args = parser.parse_args(argv)
    args.seq = args.seq or (TINY_SEQ if args.tiny else 4096)
    args.contenders = [c for c in CONTENDERS if c in args.contenders]  # the table's order
    return args


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def resolve_device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny for a smoke run)")
    return device


@contextmanager
def tuning_env(args, cache_dir: str) -> Iterator[None]:
    """A fresh kdfuse tuning cache (first steps tune, as on a new machine) and, in --max-fit, no
    tuning at every size tried, unless asked otherwise; the environment is restored on the way
    out (main may run inside another program, a test for one)."""
    wanted = {}
    if not args.keep_tuning_cache:
        wanted["KDFUSE_CACHE_DIR"] = cache_dir
    if args.max_fit and not args.fit_autotune:
        wanted["KDFUSE_AUTOTUNE"] = "0"
    before = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 1 if some contender's loss disagrees with the reference, else 0."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    title = (
        f"{'largest step' if args.max_fit else 'distillation step'} on {device_name(device)} "
        f"(bf16, seq {args.seq}{', batch ' + str(args.batch) if not args.max_fit else ''}"
        f"{', grad ckpt' if args.grad_ckpt else ''}, torch {torch.__version__})"
    )
    print(title, flush=True)
    rows: list[Row] = []
    memory: list[dict] = []
    with tempfile.TemporaryDirectory() as cache, tuning_env(args, cache):
        for key in args.pairs:
            pair_rows, pair_memory = run_pair(key, args, device)
            free_memory(device)  # the pair's models went with run_pair's frame
            if device.type == "cuda":
                print(f"  allocated after the pair: {torch.cuda.memory_allocated(device) / GiB:.2f} GiB", flush=True)
            rows += pair_rows
            memory.append(pair_memory)
            if args.json:  # after every pair: a run cut short keeps what it measured
                write_json(args, rows, memory, device, title)
    print_table(rows, title, args.max_fit)
    ok, summary = agreement_summary(rows)
    print(summary)
    for line in [] if args.max_fit else comparison_lines(rows):
        print(line)
    if args.png:
        plot(rows, args.png, args.max_fit)
    return 0 if ok else 1


def write_json(args, rows: list[Row], memory: list[dict], device: torch.device, title: str) -> None:
    out = {
        "title": title,
        "device": device_name(device),
        "torch": torch.__version__,
        "loss_rtol": {"default": LOSS_RTOL, **dict.fromkeys(sorted(BF16_MATH), LOSS_RTOL_BF16_MATH)},
        "args": vars(args),
        "memory": memory,
        "rows": [asdict(r) for r in rows],
    }
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())

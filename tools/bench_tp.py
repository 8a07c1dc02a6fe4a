"""Tensor-parallel scaling of kdfuse's vocab-parallel loss: one launch sweeps TP = 1 .. K.

    torchrun --standalone --nproc-per-node=8 tools/bench_tp.py --json tp.json --png tp.png
    torchrun --standalone --nproc-per-node=2 tools/bench_tp.py --device cpu      # smoke run, gloo

Every rank builds the same problem from one seed (default: a Llama-70B teacher's lm_head against
an 8B-wide student's, Hs=4096, Ht=8192, V=128256, N=32768 rows, bf16; ``--device cpu``: Hs=64,
Ht=96, V=1000, N=512, float32) and each method runs forward + backward (the gradients of the
student's hidden states and lm_head weight), for the configs ``fkl_ce`` (forward KL + CE) and
``jsd`` (JSD β=0.5 + CE), both at T=2 with soft and hard weights 0.5, as tools/bench.py's:

    kdfuse      TP=1: ``kdfuse.fused_linear_distill`` on the whole weights, rank 0 alone
    kdfuse-tp   TP=k, ranks 0..k-1 (a ``dist.new_group``): each holds contiguous rows of both
                lm_heads (ceil(V/k) each, the last rank the rest) and the same hidden states;
                ``fused_linear_distill(..., process_group=group)``; every rank gets the whole
                loss and hidden states' gradient, and its rows' weight gradient
    gather      TP=k, the alternative of gathering the full weights: the same shards are
                all-gathered to every rank, each rank runs single-process kdfuse on its N/k rows
                (the work split over tokens, not repeated on every rank), the weight gradient is
                reduce-scattered back to the shards, the hidden states' gradient all-gathered and
                the loss all-reduced, so each rank ends with what kdfuse-tp gives it

Measured per method: the time of one step (CUDA events; each rank's median over its timed calls,
the slowest rank's reported, as the slowest rank sets the pace), speed-up t(1)/t(k) and parallel
efficiency t(1)/(k·t(k)), the peak device memory per GPU (the method's inputs on the rank plus
``max_memory_allocated`` above them during its calls; the largest over the ranks), the bytes a
rank sends per step (the input bytes of its collectives, as ``kdfuse.collectives.counting``
counts them; for gather the same count over its own collectives) and the bytes a ring algorithm
moves per rank for them ("wire": 2(k-1)/k of an all-reduce's input, k-1 times an all-gather's,
(k-1)/k of a reduce-scatter's), and the first call's seconds (compilation included).

t(1) is measured in the same launch, on rank 0 alone while the other ranks wait on the CPU, in
the same interleaved rounds as the other methods: one launch then gives the whole table, and
t(1) is taken on one of the K GPUs with the same software, clocks history and thermal state as
the TP runs (a separate single-GPU launch could land on another GPU, at other clocks).

Timing: ``autotune.timed_calls`` per method, in ``--rounds`` rounds over every method (see
autotune.measure_interleaved for why rounds), with a barrier on a CPU (gloo) group before each so
the idle ranks neither race ahead into the next method's collectives nor keep their GPUs busy
while waiting. measure_interleaved itself is not used: its ``settle`` runs a function for a number
of seconds, so ranks would run different numbers of calls and their collectives would not pair
up; here ``--settle`` seconds become a number of untimed calls, agreed over the ranks (the largest
of their counts) before the rounds.

Numerics, once per method, on rank 0: the loss against TP=1's (relative error), the hidden
states' gradient and rank 0's rows of the weight gradient (norm-relative errors). Tolerances:
bf16 inputs, loss 1e-3 and gradients 1e-2 (the methods round different float32 sums to bf16);
float32, 1e-5 and 1e-4. A failed check is printed as FAIL and makes rank 0 exit with status 1.

``chunk_size="auto"`` (the default ``--chunk-size``) over a process group never tunes in process
(it takes ``kdfuse tune``'s cached choice, else the heuristic); so that every method resolves it
the same way the script sets ``KDFUSE_AUTOTUNE=0`` unless the environment sets it or
``--autotune`` is given. It also sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 where they are unset (NVLink multicast stays off) and prints what it set.

Output (rank 0): a markdown table with the device's name, ``--json`` (every row and the run's
settings), ``--png`` (time and peak memory against TP; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdfuse
from autotune import timed_calls
from kdfuse.collectives import Sent, counting

GiB, MB = 2**30, 1e6
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (loss relative error, gradients' norm-relative error) allowed against TP=1, per input dtype.
TOLERANCE = {torch.bfloat16: (1e-3, 1e-2), torch.float32: (1e-5, 1e-4)}


@dataclass(frozen=True)
class Config:
    name: str
    divergence: str
    temperature: float = 2.0
    soft_weight: float = 0.5
    hard_weight: float = 0.5


CONFIGS = {"fkl_ce": Config("forward KL + CE", "forward_kl"), "jsd": Config("JSD β=0.5 + CE", "jsd_beta0.5")}

Result = tuple[Tensor, Tensor, Tensor]  # (loss, the hidden states' whole gradient, this rank's weight-gradient rows)
Step = Callable[[Sent | None], Result]  # counts its own collectives into the Sent it is given


@dataclass(frozen=True)
class Split:
    """Contiguous parts of ``total`` items over k ranks: ceil(total/k) each, the last the rest."""

    total: int
    k: int

    @property
    def widest(self) -> int:
        return -(-self.total // self.k)

    def size(self, rank: int) -> int:
        return min(self.widest, self.total - rank * self.widest)

    def part(self, rank: int) -> slice:
        return slice(rank * self.widest, rank * self.widest + self.size(rank))


@dataclass
class Method:
    key: str  # "kdfuse-tp2"
    name: str  # "kdfuse", "kdfuse-tp" or "gather"
    tp: int
    step: Step | None = None  # None on the ranks outside its group
    resident: int = 0  # bytes of this rank's inputs of the method


@dataclass
class Row:
    config: str
    method: str
    tp: int
    ms: float = math.nan
    speedup: float = math.nan
    efficiency: float = math.nan
    peak_gib: float = math.nan  # per GPU: inputs + the peak above them, the largest over the ranks
    inputs_gib: float = math.nan  # rank 0's inputs of the method
    sent_mb: float = 0.0  # per rank per step, the collectives' input bytes
    wire_mb: float = 0.0  # per rank per step, a ring algorithm's traffic
    calls: dict = field(default_factory=dict)
    loss_err: float = math.nan
    grad_h_err: float = math.nan
    grad_w_err: float = math.nan
    check: str = "n/a"
    first_call_s: float = math.nan


# --------------------------------------------------------------------------------------------
# Processes and groups.
# --------------------------------------------------------------------------------------------


@dataclass
class World:
    rank: int
    size: int
    device: torch.device
    cpu: dist.ProcessGroup  # for barriers and gathering results (gloo: the waiting uses no GPU)
    groups: dict[int, dist.ProcessGroup]  # TP size k >= 2: ranks 0..k-1


def no_multicast() -> list[str]:
    """Turn NVLink multicast off where the environment leaves it unset; the names we set."""
    ours = [name for name in NO_MULTICAST if name not in os.environ]
    for name in ours:
        os.environ[name] = NO_MULTICAST[name]
    return ours


def start(device_type: str, tps: list[int]) -> World:
    """The process group (NCCL on ``cuda:LOCAL_RANK``, gloo on a CPU), a gloo group over every
    rank, and one group per TP size (every rank creates every group, as new_group requires)."""
    timeout = timedelta(minutes=20)  # rank 0 alone runs TP=1 while the others wait
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timeout, device_id=device if device_type == "cuda" else None)
    cpu = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    groups = {k: dist.new_group(list(range(k))) for k in tps if k > 1}
    return World(dist.get_rank(), dist.get_world_size(), device, cpu, groups)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# The problem and the methods.
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """The same on every rank: hidden states (the student's a leaf), labels, the full weights
    (kept on rank 0 only, for TP=1) and every TP size's shards of this rank."""

    h: Tensor
    th: Tensor
    y: Tensor
    vocab: int
    count: float  # valid rows
    full: tuple[Tensor, Tensor] | None
    shards: dict[int, tuple[Tensor, Tensor]]


def make_problem(args, world: World, tps: list[int]) -> Problem:
    gen = torch.Generator(device=world.device).manual_seed(0)
    dtype = DTYPES[args.dtype]

    def randn(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=gen, device=world.device) * scale).to(dtype)

    h = randn(args.rows, args.hs).requires_grad_()
    th = randn(args.rows, args.ht)
    ws = randn(args.vocab, args.hs, scale=args.hs**-0.5)
    wt = randn(args.vocab, args.ht, scale=args.ht**-0.5)
    y = torch.randint(0, args.vocab, (args.rows,), generator=gen, device=world.device)
    y[torch.rand(args.rows, generator=gen, device=world.device) < 0.1] = -100  # some ignored rows
    shards = {}
    for k in (k for k in tps if k > 1 and world.rank < k):
        part = Split(args.vocab, k).part(world.rank)
        shards[k] = (ws[part].clone().requires_grad_(), wt[part].clone())
    full = (ws.requires_grad_(), wt) if world.rank == 0 and 1 in tps else None
    return Problem(h, th, y, args.vocab, float((y != -100).sum()), full, shards)


def nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def loss_kwargs(cfg: Config, args) -> dict:
    chunk = args.chunk_size if args.chunk_size == "auto" else int(args.chunk_size)
    return dict(
        divergence=cfg.divergence,
        temperature=cfg.temperature,
        soft_weight=cfg.soft_weight,
        hard_weight=cfg.hard_weight,
        chunk_size=chunk,
        impl=args.impl,
    )


def single_step(p: Problem, kw: dict) -> Step:
    """TP=1: the whole weights in one process."""
    ws, wt = p.full

    def step(sent: Sent | None = None) -> Result:
        loss = kdfuse.fused_linear_distill(p.h, ws, p.th, wt, labels=p.y, **kw)
        gh, gw = torch.autograd.grad(loss, (p.h, ws))
        return loss.detach(), gh, gw

    return step


def tp_step(p: Problem, k: int, group: dist.ProcessGroup, kw: dict) -> Step:
    """kdfuse's vocab-parallel call on this rank's rows (kdfuse counts its own collectives)."""
    ws, wt = p.shards[k]

    def step(sent: Sent | None = None) -> Result:
        loss = kdfuse.fused_linear_distill(p.h, ws, p.th, wt, labels=p.y, process_group=group, **kw)
        gh, gw = torch.autograd.grad(loss, (p.h, ws))
        return loss.detach(), gh, gw

    return step


# The *_single collectives are the newer names of all_gather_into_tensor and reduce_scatter_tensor
# (deprecated there); the older names serve a torch that lacks them.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def all_gather_rows(x: Tensor, split: Split, group: dist.ProcessGroup, sent: Sent | None) -> Tensor:
    """(split.total, ...): every rank's rows in rank order. Only the last part can be short, so
    each part is padded at its end to ``split.widest`` and the padding is all at the end."""
    padded = F.pad(x, (0, 0, 0, split.widest - x.shape[0])) if x.shape[0] < split.widest else x
    out = x.new_empty((split.k * split.widest, *x.shape[1:]))
    if sent is not None:
        sent.add("all_gather", padded)
    _all_gather(out, padded.contiguous(), group=group)
    return out[: split.total]


def reduce_scatter_rows(x: Tensor, split: Split, rank: int, group: dist.ProcessGroup, sent: Sent | None) -> Tensor:
    """This rank's rows of ``x`` (split.total, ...) summed over the ranks."""
    pad = split.k * split.widest - split.total
    padded = F.pad(x, (0, 0, 0, pad)) if pad else x  # (a copy only where V is not a multiple of k)
    out = x.new_empty((split.widest, *x.shape[1:]))
    if sent is not None:
        sent.add("reduce_scatter", padded)
    _reduce_scatter(out, padded.contiguous(), group=group)
    return out[: split.size(rank)]


def gather_step(p: Problem, k: int, rank: int, group: dist.ProcessGroup, kw: dict) -> Step:
    """The full weights gathered to every rank, the work split over the rows (see the top)."""
    ws_shard, wt_shard = p.shards[k]
    vocab, rows = Split(p.vocab, k), Split(p.h.shape[0], k)
    mine = rows.part(rank)

    def step(sent: Sent | None = None) -> Result:
        with torch.no_grad():
            ws = all_gather_rows(ws_shard, vocab, group, sent)
            wt = all_gather_rows(wt_shard, vocab, group, sent)
        ws.requires_grad_()
        h = p.h[mine].detach().requires_grad_()
        loss = kdfuse.fused_linear_distill(
            h, ws, p.th[mine], wt, labels=p.y[mine], reduction="sum", normalizer=p.count, **kw
        )
        gh, gw = torch.autograd.grad(loss, (h, ws))
        gw = reduce_scatter_rows(gw, vocab, rank, group, sent)
        gh = all_gather_rows(gh, rows, group, sent)
        loss = loss.detach().clone()
        if sent is not None:
            sent.add("all_reduce_sum", loss)
        dist.all_reduce(loss, group=group)
        return loss, gh, gw

    return step


def methods(args, world: World, p: Problem, kw: dict, tps: list[int]) -> list[Method]:
    """Every method of the sweep, in the order they run; ``step`` only on the ranks that run it."""
    inputs = nbytes(p.h, p.th, p.y)
    out = []
    if 1 in tps:
        step = single_step(p, kw) if world.rank == 0 else None
        out.append(Method("kdfuse", "kdfuse", 1, step, inputs + (nbytes(*p.full) if p.full else 0)))
    makers: dict[str, Callable[[int], Step]] = {"kdfuse-tp": lambda k: tp_step(p, k, world.groups[k], kw)}
    if args.gather:
        makers["gather"] = lambda k: gather_step(p, k, world.rank, world.groups[k], kw)
    for name, make in makers.items():
        for k in (k for k in tps if k > 1):
            member = world.rank < k  # TP=k runs on ranks 0..k-1
            step = make(k) if member else None
            resident = inputs + nbytes(*p.shards[k]) if member else 0
            out.append(Method(f"{name}{k}", name, k, step, resident))
    return out


# --------------------------------------------------------------------------------------------
# First calls, numerics and bytes; then the timed rounds.
# --------------------------------------------------------------------------------------------


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float32 (the loss: |a − b| / |b|)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def errors(out: Result, ref: Result) -> tuple[float, float, float]:
    """(loss, hidden states' gradient, this rank's rows of the weight gradient) against TP=1's,
    this rank being rank 0, whose rows are TP=1's first rows."""
    loss, gh, gw = out
    return rel_err(loss, ref[0]), rel_err(gh, ref[1]), rel_err(gw, ref[2][: gw.shape[0]])


def verdict(errs: tuple[float, float, float], dtype: torch.dtype) -> str:
    loss_tol, grad_tol = TOLERANCE[dtype]
    ok = errs[0] <= loss_tol and max(errs[1:]) <= grad_tol
    return "ok" if ok else "FAIL"


class Tally(Sent):
    """A :class:`Sent` that also keeps the bytes per family of collective (the gather method's)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_family: Counter = Counter()

    def add(self, kind: str, t: Tensor) -> None:
        super().add(kind, t)
        self.by_family[family(kind)] += t.numel() * t.element_size()


def family(kind: str) -> str:
    """The family of a kind of collective: all_reduce_sum → all_reduce; the others as they are."""
    return "all_reduce" if kind.startswith("all_reduce") else kind


def counted(step: Step) -> tuple[Result, dict]:
    """One call and what it sent: collectives by kind, bytes, and bytes by family (None where
    kdfuse ran a collective other than an all-reduce: kdfuse.collectives counts only the total
    bytes, so they could not be told apart)."""
    tally = Tally()
    with counting() as sent:  # kdfuse's own collectives
        out = step(tally)  # the gather method's
    families = Counter(tally.by_family)
    if all(family(kind) == "all_reduce" for kind in sent.calls):
        families["all_reduce"] += sent.bytes
    else:
        families = None
    info = dict(calls=dict(sent.calls + tally.calls), bytes=sent.bytes + tally.bytes, by_family=families)
    return out, info


def first_calls(m: Method, world: World, ref: dict) -> dict:
    """This rank's first call (seconds, compilation included), a second one counting its
    collectives (the layout's all-reduce included: it runs on every call), a third timed
    alone for the warm-up count; on rank 0, the errors against TP=1 (whose result it keeps)."""
    t0 = time.perf_counter()
    m.step(None)
    sync(world.device)
    first_s = time.perf_counter() - t0
    out, info = counted(m.step)
    sync(world.device)
    t0 = time.perf_counter()
    m.step(None)
    sync(world.device)
    info.update(first_s=first_s, call_s=time.perf_counter() - t0)
    if world.rank == 0 and m.tp == 1:
        ref["out"] = out
    elif world.rank == 0 and "out" in ref:
        info["errors"] = errors(out, ref["out"])
    return info


def agreed_warmups(ms: list[Method], infos: dict, args, world: World) -> dict[str, int]:
    """Untimed calls per method and round: ``--warmup``, or enough to fill ``--settle`` seconds
    at the slowest rank's pace; the same count on every rank (their collectives must pair up)."""
    seconds = torch.tensor([infos[m.key]["call_s"] if m.key in infos else 0.0 for m in ms], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=world.cpu)
    return {
        m.key: max(args.warmup, math.ceil(args.settle / max(s, 1e-6)) if args.settle else 0)
        for m, s in zip(ms, seconds.tolist())
    }


def timed_rounds(ms: list[Method], warmups: dict[str, int], args, world: World) -> dict[str, dict]:
    """This rank's ``{key: {"ms": median over its timed calls, "peak": bytes above its inputs}}``
    of the methods it runs, timed in rounds over every method."""
    times: dict[str, list[float]] = {m.key: [] for m in ms if m.step}
    peaks = dict.fromkeys(times, 0)
    for _ in range(args.rounds):
        for m in ms:
            dist.barrier(group=world.cpu)  # the group's ranks start together; the rest wait on the CPU
            if m.step is None:
                continue
            step = m.step
            calls, peak = timed_calls(
                lambda step=step: step(None), warmup=warmups[m.key], repeat=args.repeat, device=world.device
            )
            times[m.key] += calls
            peaks[m.key] = max(peaks[m.key], peak)
    return {key: {"ms": statistics.median(ts), "peak": peaks[key]} for key, ts in times.items()}


def wire_bytes(by_family: dict | None, k: int) -> float:
    """Bytes a ring algorithm moves per rank for these collectives (see the top); NaN unknown."""
    if by_family is None:
        return math.nan
    factor = {"all_reduce": 2 * (k - 1) / k, "all_gather": k - 1, "reduce_scatter": (k - 1) / k}
    return sum(factor[kind] * b for kind, b in by_family.items())


def run_config(cfg_key: str, args, world: World, p: Problem, tps: list[int]) -> list[Row]:
    """Every method of one config; the rows on rank 0, [] on the others."""
    ms = methods(args, world, p, loss_kwargs(CONFIGS[cfg_key], args), tps)
    ref: dict = {}
    infos = {}
    for m in ms:
        dist.barrier(group=world.cpu)
        if m.step is not None:
            infos[m.key] = first_calls(m, world, ref)
            say(world, f"  {cfg_key} {m.key}: first call {infos[m.key]['first_s']:.1f} s")
    ref.clear()  # (TP=1's gradients: free them before the timing)
    timings = timed_rounds(ms, agreed_warmups(ms, infos, args, world), args, world)
    mine = {m.key: {**timings[m.key], "resident": m.resident} for m in ms if m.step}
    everyone = [None] * world.size if world.rank == 0 else None
    dist.gather_object(mine, everyone, dst=0, group=world.cpu)
    return rows_of(cfg_key, ms, infos, everyone, p) if world.rank == 0 else []


def rows_of(cfg_key: str, ms: list[Method], infos: dict, everyone: list[dict], p: Problem) -> list[Row]:
    """Rank 0's table rows: the slowest rank's time, the largest peak (none on a CPU, where
    autotune measures no memory), rank 0's bytes and errors."""
    rows = []
    on_cpu = p.h.device.type == "cpu"
    for m in ms:
        ranks = [r for r in everyone if m.key in r]
        info = infos[m.key]
        row = Row(cfg_key, m.name, m.tp, calls=info["calls"], first_call_s=info["first_s"])
        row.ms = max(r[m.key]["ms"] for r in ranks)
        row.peak_gib = math.nan if on_cpu else max(r[m.key]["resident"] + r[m.key]["peak"] for r in ranks) / GiB
        row.inputs_gib = m.resident / GiB
        row.sent_mb, row.wire_mb = info["bytes"] / MB, wire_bytes(info["by_family"], m.tp) / MB
        if "errors" in info:
            row.loss_err, row.grad_h_err, row.grad_w_err = info["errors"]
            row.check = verdict(info["errors"], p.h.dtype)
        rows.append(row)
    single = next((r.ms for r in rows if r.tp == 1), math.nan)
    for row in rows:
        row.speedup, row.efficiency = single / row.ms, single / (row.tp * row.ms)
    return rows


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------


def say(world: World, text: str) -> None:
    if world.rank == 0:
        print(text, flush=True)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def nccl_version() -> str:
    version = torch.cuda.nccl.version()  # a tuple (2, 21, 5); an int 22105 in older torch
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def header(args, world: World, ours: list[str]) -> dict:
    """The run's settings, printed above the table and kept in the JSON."""
    env = {name: os.environ.get(name) for name in (*NO_MULTICAST, "KDFUSE_AUTOTUNE")}
    return dict(
        device=device_name(world.device),
        gpus=world.size if world.device.type == "cuda" else 0,
        ranks=world.size,
        backend=dist.get_backend(),
        torch=torch.__version__,
        nccl=nccl_version() if world.device.type == "cuda" else None,
        shape=dict(hs=args.hs, ht=args.ht, vocab=args.vocab, rows=args.rows, dtype=args.dtype),
        impl=args.impl,
        chunk_size=args.chunk_size,
        env=env,
        env_set_by_script=ours,
        timing=dict(rounds=args.rounds, repeat=args.repeat, warmup=args.warmup, settle=args.settle),
    )


def fmt(x: float, spec: str) -> str:
    return "–" if not math.isfinite(x) else format(x, spec)


def print_table(rows: list[Row], meta: dict) -> None:
    """A markdown table (paste-ready), with the device and shapes above it."""
    s = meta["shape"]
    print(
        f"\nKD loss fwd+bwd, vocab split over TP ranks, on {meta['ranks']}× {meta['device']} ({meta['backend']}, "
        f"torch {meta['torch']}, NCCL {meta['nccl']}): Hs={s['hs']} Ht={s['ht']} V={s['vocab']} N={s['rows']} "
        f"{s['dtype']}, impl={meta['impl']}, chunk_size={meta['chunk_size']}\n"
    )
    cols = ["config", "method", "TP", "ms", "speed-up", "efficiency", "peak GiB/GPU", "inputs GiB"]
    cols += ["sent MB/step", "wire MB/step", "loss err", "grad_h err", "grad_w err", "check", "1st call s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" if i < 2 else "--:" for i in range(len(cols))) + "|")
    for r in rows:
        cells = [r.config, r.method, str(r.tp), fmt(r.ms, ".2f"), fmt(r.speedup, ".2f"), fmt(r.efficiency, ".2f")]
        cells += [fmt(r.peak_gib, ".2f"), fmt(r.inputs_gib, ".2f"), fmt(r.sent_mb, ".4g"), fmt(r.wire_mb, ".4g")]
        cells += [fmt(r.loss_err, ".1e"), fmt(r.grad_h_err, ".1e"), fmt(r.grad_w_err, ".1e"), r.check]
        cells += [fmt(r.first_call_s, ".1f")]
        print("| " + " | ".join(cells) + " |")
    loss_tol, grad_tol = TOLERANCE[DTYPES[s["dtype"]]]
    print(f"\nchecks against TP=1: loss rel err <= {loss_tol:g}, gradients' norm-relative err <= {grad_tol:g}")
    for key in sorted({r.config for r in rows}):
        c = CONFIGS[key]
        print(f"{key}: {c.name}, T={c.temperature:g}, soft weight {c.soft_weight:g}, hard weight {c.hard_weight:g}")


def plot(rows: list[Row], meta: dict, path: str) -> None:
    """Time and peak memory per GPU against TP, one row of panels per config."""
    try:
        import matplotlib
    except ImportError:
        print(f"--png {path}: skipped, matplotlib is not installed")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({r.config for r in rows})
    fig, axes = plt.subplots(len(configs), 3, figsize=(14, 3.4 * len(configs)), squeeze=False)
    for panels, cfg in zip(axes, configs):
        plot_config([r for r in rows if r.config == cfg], panels)
        titles = ("fwd+bwd ms", "parallel efficiency t(1)/(TP·t(TP))", "peak GiB per GPU")
        for ax, title in zip(panels, titles):
            ax.set_title(f"{cfg}: {title}", fontsize=9)
    s = meta["shape"]
    fig.suptitle(f"{meta['device']}: Hs={s['hs']} Ht={s['ht']} V={s['vocab']} N={s['rows']} {s['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_config(rows: list[Row], panels) -> None:
    """Time, efficiency and peak memory of kdfuse-tp and gather, both from the TP=1 point."""
    single = [r for r in rows if r.tp == 1]
    tps = sorted({r.tp for r in rows})
    for name, color in (("kdfuse-tp", "tab:green"), ("gather", "tab:gray")):
        sel = single + sorted((r for r in rows if r.method == name), key=lambda r: r.tp)
        for ax, values in zip(panels, ([r.ms for r in sel], [r.efficiency for r in sel], [r.peak_gib for r in sel])):
            ax.plot([r.tp for r in sel], values, "o-", color=color, label=name)
    if single:
        panels[0].plot(tps, [single[0].ms / k for k in tps], "k--", lw=0.8, label="t(1)/TP")
        panels[1].axhline(1.0, color="k", ls="--", lw=0.8)
    if not any(math.isfinite(r.peak_gib) for r in rows):
        panels[2].text(0.5, 0.5, "not measured on a CPU", ha="center", transform=panels[2].transAxes)
    for ax in panels:
        ax.set_xscale("log", base=2)
        ax.set_xticks(tps, [str(k) for k in tps])
        ax.set_xlabel("TP ranks")
        ax.legend(fontsize=8)


# --------------------------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tp", type=int, nargs="+", help="TP sizes (default: 1, 2, 4, .. up to the ranks, and theirs)")
    parser.add_argument("--hs", type=int, help="student hidden size (default 4096; --device cpu: 64)")
    parser.add_argument("--ht", type=int, help="teacher hidden size (default 8192; --device cpu: 96)")
    parser.add_argument("--vocab", type=int, help="vocabulary (default 128256; --device cpu: 1000)")
    parser.add_argument("--rows", type=int, help="N, rows of hidden states (default 32768; --device cpu: 512)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bf16 (--device cpu: fp32)")
    parser.add_argument("--impl", choices=["compile", "eager"], help="kdfuse's impl (default compile; cpu: eager)")
    parser.add_argument("--chunk-size", default="auto", help='"auto" or rows per chunk')
    parser.add_argument("--autotune", action="store_true", help="let single-process calls tune chunk_size in process")
    parser.add_argument("--no-gather", dest="gather", action="store_false", help="skip the gather method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per method and round, at least")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every method")
    parser.add_argument("--settle", type=float, help="seconds of untimed calls per method and round (cpu: 0)")
    parser.add_argument("--json", help="write the rows and the run's settings here")
    parser.add_argument("--png", help="draw time and peak memory against TP here")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    defaults = dict(hs=(4096, 64), ht=(8192, 96), vocab=(128256, 1000), rows=(32768, 512), dtype=("bf16", "fp32"))
    defaults.update(impl=("compile", "eager"), settle=(1.0, 0.0))
    for name, (gpu_value, cpu_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu_value if cpu else gpu_value)
    return args


def tp_sizes(asked: list[int] | None, ranks: int) -> list[int]:
    """The TP sizes to sweep, checked against the ranks launched."""
    if asked is None:
        asked = sorted({1 << i for i in range(ranks.bit_length()) if 1 << i <= ranks} | {ranks})
    if any(k < 1 or k > ranks for k in asked):
        raise SystemExit(f"--tp {asked}: each TP size must be between 1 and the {ranks} ranks launched")
    return sorted(set(asked))


def check_shapes(args, tps: list[int]) -> None:
    """Every split must leave each rank some rows (only the last part may be short)."""
    for k in tps:
        for name, total in (("--vocab", args.vocab), ("--rows", args.rows)):
            if Split(total, k).size(k - 1) < 1:
                raise SystemExit(f"{name} {total} over {k} ranks leaves the last rank nothing; pick another size")


def standalone_env() -> None:
    """Without torchrun: one rank (TP=1 alone), meeting itself on a free local port."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv: list[str] | None = None) -> int:
    ours = no_multicast()  # before the process group exists
    standalone_env()
    args = parse(argv)
    if not args.autotune:
        os.environ.setdefault("KDFUSE_AUTOTUNE", "0")
    tps = tp_sizes(args.tp, int(os.environ.get("WORLD_SIZE", "1")))
    check_shapes(args, tps)
    world = start(args.device, tps)
    meta = header(args, world, ours)
    say(world, f"{meta['device']} ×{world.size}, TP sizes {tps}; set here: {ours or 'nothing'}; env {meta['env']}")
    p = make_problem(args, world, tps)
    rows: list[Row] = []
    for cfg_key in args.configs:
        rows += run_config(cfg_key, args, world, p, tps)
        if world.rank == 0 and args.json:  # after every config: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(dict(meta, rows=[asdict(r) for r in rows]), indent=1))
    failed = False
    if world.rank == 0:
        print_table(rows, meta)
        if args.png:
            plot(rows, meta, args.png)
        failed = any(r.check == "FAIL" for r in rows)
    dist.barrier(group=world.cpu)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

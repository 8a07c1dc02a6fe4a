"""Vocab-parallel losses on torch.distributed, and kdfuse under DDP and FSDP2 (gloo on the CPU;
NCCL on GPUs with ``KDFUSE_DIST_BACKEND=nccl``).

Every case runs on all ranks of a world of each size in ``KDFUSE_DIST_WORLDS`` (default 2 and 3;
tests/dist_harness.py: one world per size, many cases inside it). Each rank builds the same full
problem from a seed on the CPU, keeps its own contiguous vocabulary rows (shards of unequal
sizes, some empty), moves them to its device (``cuda:rank`` with NCCL) and compares the
vocab-parallel loss and gradients, moved back to the CPU, with the single-process float64
reference on the whole weights, computed on the CPU: the loss on every rank, the hidden states'
whole gradient on every rank, the weight's (and bias's) gradient for this rank's rows. Float64
throughout, so the agreement is to float64 rounding on either device.

On an 8-GPU machine: ``KDFUSE_DIST_BACKEND=nccl KDFUSE_DIST_WORLDS=2,4,8 pytest tests/test_distributed.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_harness import WORLDS, close_worlds, rank_device, world

import kdfuse
from kdfuse import collectives, registry

F64 = torch.float64
V, HS, HT, K = 13, 6, 5, 4
# Rows per rank, V in all: uneven, and an empty shard in every world of more than 2 ranks.
SIZES = {
    2: (8, 5),
    3: (6, 0, 7),
    4: (5, 0, 6, 2),
    5: (4, 2, 0, 5, 2),
    6: (2, 4, 0, 4, 2, 1),
    7: (3, 1, 0, 3, 1, 3, 2),
    8: (3, 1, 0, 3, 1, 1, 3, 1),
}
assert all(sum(sizes) == V and len(sizes) == n for n, sizes in SIZES.items())
if unknown := sorted(set(WORLDS) - set(SIZES)):
    raise ValueError(f"KDFUSE_DIST_WORLDS: no shard sizes for worlds of {unknown} ranks (add them to SIZES)")


@pytest.fixture(scope="module", autouse=True)
def _close_worlds():
    yield
    close_worlds()


# --------------------------------------------------------------------------------------------
# What runs on each rank.
# --------------------------------------------------------------------------------------------


def _hellinger(student, teacher):
    """A user's dense divergence (no per-entry terms kdfuse knows): its rows are gathered."""
    return 0.5 * (student.softmax(-1).sqrt() - teacher.softmax(-1).sqrt()).square().sum(-1)


def _user_sparse(student, ids, logprobs):
    """A user's top-k divergence: −Σ_k p_k log p_s[id_k]."""
    return -(logprobs.exp() * student.log_softmax(-1).gather(-1, ids)).sum(-1)


def _problem(case: dict) -> dict:
    """The full single-process problem of ``case``, the same on every rank (one seed)."""
    gen = torch.Generator().manual_seed(case["seed"])
    n = case["rows"]

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * scale

    labels = torch.randint(0, V, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.25] = -100
    full = dict(student_hidden=randn(n, HS), student_weight=randn(V, HS, scale=2.0), labels=labels)
    if case.get("bias"):
        full["student_bias"] = randn(V)
    teacher = case["teacher"]
    if teacher == "hidden":
        full.update(teacher_hidden=randn(n, HT), teacher_weight=randn(V, HT, scale=2.0))
        if case.get("bias"):
            full["teacher_bias"] = randn(V)
    elif teacher == "logits":
        full["teacher_logits"] = randn(n, V, scale=3.0)
    else:
        logprobs, ids = randn(n, V, scale=3.0).log_softmax(-1).topk(K, dim=-1)
        logprobs[0, K // 2 :] = float("-inf")  # a padded row: its padding repeats an id
        ids[0, K // 2 :] = ids[0, 0]
        full["teacher_topk"] = (ids, logprobs)
    return full


def _to(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or a tuple or dict of them and other values) with its tensors on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _local(full: dict, sizes: tuple[int, ...], rank: int) -> dict:
    """This rank's view: its rows of each lm_head and bias, its columns of the teacher's logits."""
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    local = dict(full)
    for name in ("student_weight", "student_bias", "teacher_weight", "teacher_bias"):
        if name in full:
            local[name] = full[name][rows]
    if "teacher_logits" in full:
        local["teacher_logits"] = full["teacher_logits"][:, rows]
    return local


def _grads(fn, inputs: dict, kwargs: dict, grad_output: torch.Tensor | None):
    """(result, {name: gradient}) of the student's tensors, as fresh leaves."""
    names = [n for n in ("student_hidden", "student_weight", "student_bias") if n in inputs]
    leaves = {n: inputs[n].clone().requires_grad_() for n in names}
    out = fn(**{**inputs, **leaves}, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(loss, list(leaves.values()), grad_outputs=grad_output)
    return out, dict(zip(names, grads))


def _kwargs(case: dict) -> dict:
    names = ("divergence", "temperature", "hard_weight", "reduction", "softcap", "return_entropy")
    names += ("student_softcap", "teacher_softcap", "student_logit_scale", "teacher_logit_scale")
    kwargs = {k: case[k] for k in names if k in case}
    if case.get("normalizer"):
        kwargs["normalizer"] = case["normalizer"]
    return {**kwargs, "chunk_size": case["chunk"], "return_parts": case.get("parts", False)}


def check_vocab_parallel(case: dict) -> dict:
    """One case on this rank: the vocab-parallel result (on the rank's device) against the
    reference (on the CPU)."""
    rank, size, device = dist.get_rank(), dist.get_world_size(), rank_device()
    sizes = case.get("sizes", SIZES[size])
    full = _problem(case)
    kwargs = _kwargs(case)
    go = None
    if case.get("reduction") == "none":
        go = torch.randn(case["rows"], generator=torch.Generator().manual_seed(7), dtype=F64)
    want, want_grads = _grads(kdfuse.fused_linear_distill_ref, full, kwargs, go)
    local = _to(_local(full, sizes, rank), device)
    with collectives.counting() as sent:
        got, got_grads = _grads(
            functools.partial(kdfuse.fused_linear_distill, process_group=dist.group.WORLD, impl=case["impl"]),
            local,
            kwargs,
            _to(go, device),
        )
    got, got_grads = _to(got, torch.device("cpu")), _to(got_grads, torch.device("cpu"))
    for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grads["student_hidden"], want_grads["student_hidden"], rtol=1e-10, atol=1e-12)
    for name in ("student_weight", "student_bias"):
        if name in got_grads:
            mine = _local({name: want_grads[name]}, sizes, rank)[name]
            torch.testing.assert_close(got_grads[name], mine, rtol=1e-10, atol=1e-12)
    return {"calls": dict(sent.calls), "bytes": sent.bytes}


def _cases() -> list[dict]:
    """Every built-in (dense and top-k), a user's divergence of each kind, and a rotation of the
    other options (CE, temperature, softcaps, logit scales, the student's entropy, reductions,
    normalizer, parts, bias, chunk sizes that do not divide N)."""
    dense = [*registry.names(sparse=False), "jsd_beta0.3", "jsd_beta0", "skew_kl_alpha1", _hellinger]
    sparse = [*registry.names(sparse=True), _user_sparse]
    options = [
        dict(hard_weight=0.5, temperature=2.0, chunk=4),
        dict(reduction="sum", normalizer=7.0, chunk=5, bias=True),
        dict(reduction="none", hard_weight=0.3, chunk=3, softcap=4.0),
        dict(temperature=0.7, chunk=16, parts=True),
        dict(reduction="sum", hard_weight=1.0, chunk=1),
        dict(teacher_softcap=3.0, student_logit_scale=0.5, chunk=4, return_entropy=True, hard_weight=0.2),
        dict(student_softcap=2.0, teacher_logit_scale=2.0, reduction="none", return_entropy=True, chunk=3),
    ]
    cases = []
    for i, divergence in enumerate(dense):
        teacher = ("hidden", "logits")[i % 2]
        cases.append(dict(divergence=divergence, teacher=teacher, **options[i % len(options)]))
    for i, divergence in enumerate(sparse):
        option = {k: v for k, v in options[(i + 2) % len(options)].items() if k != "bias"}
        cases.append(dict(divergence=divergence, teacher="topk", **option))
    for i, case in enumerate(cases):
        case.update(seed=i, rows=11, impl="eager")
    return cases


CASES = _cases()


def _case_id(case: dict) -> str:
    div = case["divergence"]
    return f"{div if isinstance(div, str) else div.__name__}-{case['teacher']}"


# --------------------------------------------------------------------------------------------
# The tests.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", WORLDS, ids=lambda n: f"world{n}")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_vocab_parallel_matches_the_single_process_result(size, case):
    world(size).run(check_vocab_parallel, case)


@pytest.mark.parametrize(
    ("teacher", "divergence", "per_row"),
    [
        # Row statistics: maxima (3), sums (3 + the label's logit), term sums (2).
        ("hidden", "forward_kl", 3 + 4 + 2),
        ("logits", "jsd_beta0.3", 3 + 4 + 2),
        # Complement maxima (2), then its sums (2), the label's logit and the K logits at the ids.
        ("topk", "topk_forward_kl_bucket", 2 + 2 + 1 + K),
        # The student's entropy: one more sum (its complement's share; the top-k's is local).
        ("topk", "topk_soft_ce_renormalize+entropy", 2 + 2 + 1 + K + 1),
        ("hidden", "reverse_kl+entropy", 3 + 4 + 1 + 2),
    ],
)
def test_the_built_ins_send_row_statistics_only(teacher, divergence, per_row):
    """Per chunk of C rows a built-in all-reduces a few numbers per row (float64 here) and never
    a (C, V) block; once per call the layout (W × 4 int64: each rank's shard size, N, chunk size
    and whether it failed) and the hidden states' gradient (N, Hs); nothing else. (T = 2: the
    entropy is the student's at the temperature, checked against the reference.)"""
    divergence, entropy = divergence.removesuffix("+entropy"), divergence.endswith("+entropy")
    case = dict(CASES[0], teacher=teacher, divergence=divergence, rows=10, chunk=4, return_entropy=entropy)
    assert case["temperature"] == 2.0
    (sent, _) = world(2).run(check_vocab_parallel, case)
    rows, chunks = 10, 3  # chunks of 4, 4 and 2 rows
    assert sent["bytes"] == 8 * (per_row * rows + rows * HS) + 8 * 4 * 2, sent
    collectives_per_chunk = 2 if teacher == "topk" else 3
    assert sum(sent["calls"].values()) == collectives_per_chunk * chunks + 2, sent["calls"]


def check_forward_only(case: dict) -> int:
    """``case`` without gradients (evaluation): the loss against the reference; the bytes sent."""
    rank, device = dist.get_rank(), rank_device()
    full = _problem(case)
    kwargs = _kwargs(case)
    want = kdfuse.fused_linear_distill_ref(**full, **kwargs)
    local = _to(_local(full, SIZES[dist.get_world_size()], rank), device)
    with torch.no_grad(), collectives.counting() as sent:
        got = kdfuse.fused_linear_distill(**local, **kwargs, process_group=dist.group.WORLD, impl=case["impl"])
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)
    return sent.bytes


@pytest.mark.parametrize(
    ("teacher", "divergence", "per_row"),
    [
        # No gradient: maxima (3), sums (4), the term sums alone (1).
        ("hidden", "jsd_beta0.3", 3 + 4 + 1),
        ("topk", "topk_forward_kl_renormalize", 2 + 2 + 1 + K),
        ("logits", _hellinger, None),
    ],
    ids=["dense", "topk", "user"],
)
def test_forward_only(teacher, divergence, per_row):
    case = dict(CASES[0], teacher=teacher, divergence=divergence, rows=10, chunk=4)
    for sent in world(3).run(check_forward_only, case):
        if per_row is not None:
            assert sent == 8 * per_row * 10 + 8 * 4 * 3, sent  # (+ the layout; no hidden-state gradient)


def test_a_users_divergence_gathers_its_chunks_rows():
    """A divergence of the user's needs whole rows: each chunk's student and teacher logits are
    all-gathered, padded to the widest shard (gloo gathers equal sizes): (C, max V_r) each."""
    (sent, _) = world(2).run(
        check_vocab_parallel, dict(CASES[0], teacher="hidden", divergence=_hellinger, rows=10, chunk=4)
    )
    widest = max(SIZES[2])
    assert sent["calls"]["all_gather"] == 2 * 3
    assert sent["bytes"] == 8 * (2 * 10 * widest + 10 * HS) + 8 * 4 * 2, sent


def test_a_new_layout_where_one_ranks_shard_keeps_its_size():
    """The layout is agreed on every call: rank 0 keeps 6 rows while ranks 1 and 2 swap 0 and 7
    (a rank that remembered the last layout by its own row count would reuse a stale one, and
    its collectives would no longer pair up with the others')."""
    for sizes in ((6, 0, 7), (6, 7, 0), (6, 0, 7)):
        world(3).run(check_vocab_parallel, dict(CASES[0], sizes=sizes))


def check_disagreement(kind: str) -> str:
    """A call where the ranks disagree (``kind``): rank 2's teacher shard has a row too many, or
    the ranks pass different int chunk sizes or different N. Every rank must raise (none may
    wait in a collective); then a good call still pairs up. Returns what this rank raised."""
    rank, device = dist.get_rank(), rank_device()
    sizes = SIZES[dist.get_world_size()]
    full = _problem(dict(teacher="hidden", seed=5, rows=8))
    local = _to(_local(full, sizes, rank), device)
    kwargs = dict(labels=local.pop("labels"), chunk_size=4, impl="eager", process_group=dist.group.WORLD)
    bad = dict(local)
    if kind == "teacher_rows" and rank == 2:
        bad["teacher_weight"] = torch.cat([bad["teacher_weight"], bad["teacher_weight"][:1]])
    if kind == "chunk_size":
        kwargs["chunk_size"] = 4 + rank
    if kind == "tokens" and rank == 1:
        bad["student_hidden"], bad["teacher_hidden"] = bad["student_hidden"][:-1], bad["teacher_hidden"][:-1]
        kwargs["labels"] = kwargs["labels"][:-1]
    try:
        kdfuse.fused_linear_distill(**bad, **kwargs)
    except (RuntimeError, ValueError) as error:
        raised = f"{type(error).__name__}: {error}"
    else:
        raised = "nothing"
    kdfuse.fused_linear_distill(**local, **dict(kwargs, chunk_size=4, labels=_to(full["labels"], device)))
    return raised


@pytest.mark.parametrize("kind", ["teacher_rows", "chunk_size", "tokens"])
def test_a_disagreement_raises_on_every_rank(kind):
    raised = world(3).run(check_disagreement, kind)
    if kind == "teacher_rows":
        assert "teacher's shard must be the student's vocabulary rows" in raised[2], raised
        assert all("ranks [2] of the process group rejected their inputs" in r for r in raised[:2]), raised
    else:
        what = {"chunk_size": "same chunk_size; by rank: [4, 5, 6]", "tokens": "by rank: [8, 7, 8]"}[kind]
        assert all(r.startswith("ValueError") and what in r for r in raised), raised


def check_compiled_rows(case: dict, rows: tuple[int, ...]) -> list[int]:
    """``case`` compiled, for each row count in turn: the new Dynamo graphs each call made."""
    from torch._dynamo.utils import counters

    made = []
    for n in rows:
        before = counters["stats"]["unique_graphs"]
        check_vocab_parallel(dict(case, rows=n))
        made.append(counters["stats"]["unique_graphs"] - before)
    return made


@pytest.mark.slow
def test_compiled_local_work():
    """impl="compile": each rank's work between the collectives, compiled per spec, once: a new
    N (last chunks of 1, 2 or 3 rows of 4) compiles nothing more."""
    for divergence, teacher in (("jsd_beta0.3", "hidden"), ("topk_soft_ce_bucket", "topk")):
        case = dict(CASES[0], divergence=divergence, teacher=teacher, impl="compile", chunk=4)
        for made in world(2).run(check_compiled_rows, case, (9, 10, 11, 14)):
            assert made[0] > 0 and made[1:] == [0, 0, 0], (divergence, made)


# --------------------------------------------------------------------------------------------
# DTensor weights (tensor parallelism over a 1-D mesh), DDP and FSDP2.
# --------------------------------------------------------------------------------------------


def check_dtensor_weights() -> None:
    """Weights as DTensors sharded on dim 0 over a 1-D mesh, ``process_group=`` the mesh: the
    same loss, and the weight's gradient a DTensor of the same placement (torch.chunk's split)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    device = rank_device()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    full = _problem(dict(teacher="hidden", seed=3, rows=10))
    on_device = _to(full, device)
    kwargs = dict(labels=on_device["labels"], hard_weight=0.5, divergence="jsd_beta0.3", chunk_size=4, impl="eager")
    weight = distribute_tensor(on_device["student_weight"], mesh, [Shard(0)]).requires_grad_()
    teacher_weight = distribute_tensor(on_device["teacher_weight"], mesh, [Shard(0)])
    hidden = on_device["student_hidden"].clone().requires_grad_()
    loss = kdfuse.fused_linear_distill(
        hidden, weight, on_device["teacher_hidden"], teacher_weight, process_group=mesh, **kwargs
    )
    loss.backward()
    want, want_grads = _grads(
        kdfuse.fused_linear_distill_ref,
        {k: full[k] for k in full if k != "labels"},
        {**kwargs, "labels": full["labels"]},
        None,
    )
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hidden.grad.cpu(), want_grads["student_hidden"], rtol=1e-10, atol=1e-12)
    assert weight.grad.placements == (Shard(0),)
    grad = weight.grad.full_tensor().cpu()
    torch.testing.assert_close(grad, want_grads["student_weight"], rtol=1e-10, atol=1e-12)


def check_fsdp2_mixed_precision() -> None:
    """An FSDP2 lm_head kept in float64 (a mixed-precision policy's master weights, float32 on
    GPUs) with float32 hidden states: gathered in the hidden states' dtype, the same loss and
    gradient as the cast full weight, the gradient back in the shard's dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    device = rank_device()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    full = _to(_problem(dict(teacher="hidden", seed=6, rows=10)), device)
    narrow = {k: v.float() if v.is_floating_point() else v for k, v in full.items()}
    kwargs = dict(labels=full["labels"], hard_weight=0.5, chunk_size=4, impl="eager")
    weight = distribute_tensor(full["student_weight"], mesh, [Shard(0)]).requires_grad_()
    loss = kdfuse.fused_linear_distill(
        narrow["student_hidden"], weight, narrow["teacher_hidden"], narrow["teacher_weight"], **kwargs
    )
    loss.backward()
    cast = narrow["student_weight"].clone().requires_grad_()
    want = kdfuse.fused_linear_distill(
        narrow["student_hidden"], cast, narrow["teacher_hidden"], narrow["teacher_weight"], **kwargs
    )
    want.backward()
    torch.testing.assert_close(loss, want)
    assert weight.grad.dtype == F64 and weight.grad.placements == (Shard(0),)
    torch.testing.assert_close(weight.grad.full_tensor().float(), cast.grad)  # (every rank: the same data)


@pytest.mark.parametrize("size", WORLDS, ids=lambda n: f"world{n}")
def test_fsdp2_mixed_precision_weights(size):
    world(size).run(check_fsdp2_mixed_precision)


@pytest.mark.parametrize("size", WORLDS, ids=lambda n: f"world{n}")
def test_dtensor_weights_over_a_mesh(size):
    world(size).run(check_dtensor_weights)


class _Student(torch.nn.Module):
    """Embedding + one layer (the body) and an lm_head the loss reads outside forward."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(V, HS).double()
        self.body = torch.nn.Linear(HS, HS).double()
        self.lm_head = torch.nn.Linear(HS, V, bias=False).double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(self.embed(ids)))


def _batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each rank's own batch (rank r: r + 2 sequences of 5 tokens; different ignored tokens)."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for rank in range(world_size):
        ids = torch.randint(0, V, (rank + 2, 5), generator=gen)
        labels = ids.roll(-1, 1).masked_fill(torch.rand(ids.shape, generator=gen) < 0.3, -100)
        out.append((ids, labels))
    return out


def _distill(model, teacher_weight, ids, labels, normalizer, weight=None, hidden=None):
    hidden = model(ids) if hidden is None else hidden
    teacher_hidden = torch.sin(hidden.detach() * 3)  # a frozen teacher's stand-in, fixed per token
    return kdfuse.fused_linear_distill(
        hidden,
        model.lm_head.weight if weight is None else weight,
        teacher_hidden,
        teacher_weight,
        labels=labels,
        hard_weight=0.5,
        reduction="sum",
        normalizer=normalizer,
        impl="eager",
        chunk_size=4,
    )


def _single_process_grads(world_size: int) -> dict[str, torch.Tensor]:
    """The gradients of the global-batch mean loss, in one process on every rank's batch."""
    model = _Student(seed=0)
    teacher_weight = torch.randn(V, HS, generator=torch.Generator().manual_seed(5), dtype=F64)
    batches = _batches(world_size)
    count = sum(int((labels != -100).sum()) for _, labels in batches)
    for ids, labels in batches:
        _distill(model, teacher_weight, ids, labels, float(count)).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _global_count(labels: torch.Tensor) -> torch.Tensor:
    count = (labels != -100).sum().to(F64)
    dist.all_reduce(count)
    return count


def check_ddp() -> None:
    """DDP: each rank its own batch; normalizer = the global valid-token count / world size (DDP
    averages gradients over ranks), so the gradients equal the single-process gradients of the
    mean over the concatenated batch."""
    rank, size, device = dist.get_rank(), dist.get_world_size(), rank_device()
    device_ids = None if device.type == "cpu" else [device.index]
    model = torch.nn.parallel.DistributedDataParallel(_Student(seed=0).to(device), device_ids=device_ids)
    teacher_weight = torch.randn(V, HS, generator=torch.Generator().manual_seed(5), dtype=F64).to(device)
    ids, labels = _to(_batches(size)[rank], device)
    _distill(model, teacher_weight, ids, labels, _global_count(labels) / size, model.module.lm_head.weight).backward()
    want = _single_process_grads(size)  # (on the CPU)
    for name, p in model.module.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), want[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", WORLDS, ids=lambda n: f"world{n}")
def test_ddp_global_normalizer(size):
    world(size).run(check_ddp)


def check_fsdp2() -> None:
    """FSDP2: after the forward the lm_head's weight is a DTensor shard of the data-parallel mesh
    (not vocabulary parallelism); kdfuse gathers it once per call and its gradient comes back to
    the shards averaged, as FSDP2 averages. The teacher, frozen and sharded too, is only
    gathered. The same normalizer recipe as DDP."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    rank, size, device = dist.get_rank(), dist.get_world_size(), rank_device()
    model = _Student(seed=0).to(device)  # (fully_shard shards the parameters where they are)
    fully_shard(model.body)
    fully_shard(model, reshard_after_forward=True)
    teacher_full = torch.randn(V, HS, generator=torch.Generator().manual_seed(5), dtype=F64).to(device)
    teacher_weight = distribute_tensor(teacher_full, model.lm_head.weight.device_mesh, model.lm_head.weight.placements)
    ids, labels = _to(_batches(size)[rank], device)
    hidden = model(ids)
    assert isinstance(model.lm_head.weight, DTensor)  # resharded after the forward
    normalizer = _global_count(labels) / size
    with CommDebugMode() as comms:  # rows 10..20 in chunks of 4: several chunks, one gather per weight
        loss = _distill(model, teacher_weight, ids, labels, normalizer, model.lm_head.weight, hidden)
    assert comms.get_total_counts() == 2, comms.get_comm_counts()
    loss.backward()
    want = _single_process_grads(size)  # (on the CPU)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor().cpu(), want[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", WORLDS, ids=lambda n: f"world{n}")
def test_fsdp2_gathers_a_sharded_lm_head_once(size):
    world(size).run(check_fsdp2)

"""The ``kdfuse`` command: tune chunk sizes ahead of time and manage the tuning cache.

    kdfuse tune                                   # the tiny preset: seconds, on any machine
    kdfuse tune --preset llama3-8b-1b --tokens 8192,32768
    kdfuse tune --vocab 32000 --student-hidden 2048 --teacher-hidden 4096 --tokens 8192
    kdfuse tune --preset qwen2.5-7b-0.5b --memory-budget 0.5 --json
    kdfuse tune --plot sweep.png                  # needs matplotlib: pip install 'kdfuse[plot]'
    kdfuse cache show | clear | path

``kdfuse tune`` measures every candidate chunk size for each token count's bucket (a full sweep,
unlike the time-bounded tuning ``chunk_size="auto"`` does in-process), writes each winner to the
cache ``chunk_size="auto"`` reads (``KDFUSE_CACHE_DIR``), and prints a table per shape: median
time of forward + backward, its ratio to the GEMM floor (timed after the candidates), the peak
extra device memory, and for the leaner near-ties the median ratio of their times to the
fastest's when timed in pairs with it (how the winner is decided, see autotune.tune). Shapes
whose full sweep is already cached for this device and these software versions are reported
without measuring, unless ``--force`` (or ``KDFUSE_FORCE_RETUNE=1``) is given.

On a CPU the timing uses ``impl="eager"`` by default, because torch.compile's first CPU graph
takes 10-20 s, longer than the whole ``tiny`` sweep; ``--impl compile`` times the compiled path.
Peak memory is only measured on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autotune import TuningCache, resolve_device

from . import registry
from .env import parse_memory_budget, settings
from .fused import fused_linear_distill
from .sweep import build_problem, distill_step, run_sweep
from .tuning import (
    TIME_SLACK,
    Sweep,
    TuningKey,
    cached_sweep,
    candidate_chunk_sizes,
    describe,
    format_bytes,
    make_key,
    open_cache,
    resolve_memory_budget,
)

__all__ = ["PRESETS", "Preset", "ShapeResult", "build_parser", "main"]

_DTYPES = ("bfloat16", "float16", "float32", "float64")
_CPU_NOTE = "timed with impl='eager' on CPU (torch.compile's first CPU graph takes 10-20 s); --impl compile to time it"


@dataclass(frozen=True)
class Preset:
    """A student/teacher pair's lm_head shapes and the token counts to tune for."""

    student_hidden: int
    teacher_hidden: int
    vocab: int
    tokens: tuple[int, ...]

    def __str__(self) -> str:
        tokens = ",".join(map(str, self.tokens))
        return f"Hs={self.student_hidden} Ht={self.teacher_hidden} V={self.vocab} tokens {tokens}"


PRESETS = {
    "tiny": Preset(student_hidden=64, teacher_hidden=96, vocab=1000, tokens=(256, 1024)),
    "llama3-8b-1b": Preset(student_hidden=2048, teacher_hidden=4096, vocab=128256, tokens=(4096, 8192, 16384)),
    "qwen2.5-7b-0.5b": Preset(student_hidden=896, teacher_hidden=3584, vocab=151936, tokens=(4096, 8192, 16384)),
}


@dataclass(frozen=True)
class ShapeResult:
    """One shape's sweep, the requested token counts that fall in its bucket, and whether it
    came from the cache."""

    tokens: tuple[int, ...]
    sweep: Sweep
    cached: bool
    doubt: str | None = None  # why its timings are implausible (no winner then), see implausible()


# --------------------------------------------------------------------------------------------
# Arguments.
# --------------------------------------------------------------------------------------------


def _argument(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse ``type`` whose ValueError message is shown as is."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def _positive_list(text: str) -> tuple[int, ...]:
    """``"4096,8192"`` -> ``(4096, 8192)``, duplicates dropped."""
    return tuple(dict.fromkeys(_positive(part) for part in text.split(",") if part.strip()))


def _divergence(name: str) -> str:
    """A built-in's name (kdfuse.registry): dense, or sparse with a ``topk_`` prefix."""
    registry.get(name)  # raises ValueError naming the built-ins and the nearest names
    return name


def _device(text: str) -> torch.device:
    device = resolve_device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def build_parser() -> argparse.ArgumentParser:
    """The ``kdfuse`` argument parser."""
    parser = argparse.ArgumentParser(prog="kdfuse", description="kdfuse: fused knowledge-distillation losses.")
    commands = parser.add_subparsers(dest="command")
    _add_tune_command(commands)
    cache = commands.add_parser("cache", help="show, clear or locate this device's tuning cache")
    cache.add_argument("action", choices=("show", "clear", "path"))
    cache.add_argument("--device", type=_argument(_device), help="default: the current CUDA device, else cpu")
    return parser


def _add_tune_command(commands) -> None:
    tune = commands.add_parser(
        "tune",
        help="measure chunk sizes and cache the winner",
        description="Sweep the candidate chunk sizes for each shape and cache the winner (the leanest within "
        f"{TIME_SLACK:.0%} of the fastest, timed in pairs with it) for chunk_size='auto'. "
        "Explicit shape options override the preset's.",
        epilog="presets: " + "; ".join(f"{name}: {preset}" for name, preset in PRESETS.items()),
    )
    _add_problem_arguments(tune)
    _add_measurement_arguments(tune)


def _add_problem_arguments(tune: argparse.ArgumentParser) -> None:
    """What ``kdfuse tune`` tunes: the shapes, the loss, the candidates."""
    tune.add_argument(
        "--preset", default="tiny", choices=list(PRESETS), help="model pair and token counts (default: tiny)"
    )
    tune.add_argument("--tokens", type=_argument(_positive_list), metavar="N[,N...]", help="rows (batch*seq) per call")
    tune.add_argument("--student-hidden", type=_argument(_positive), metavar="HS", help="student hidden size")
    teacher = tune.add_mutually_exclusive_group()
    teacher.add_argument("--teacher-hidden", type=_argument(_positive), metavar="HT", help="teacher hidden size")
    teacher.add_argument("--teacher-logits", action="store_true", help="the teacher is given as dense logits")
    teacher.add_argument(
        "--teacher-topk",
        type=_argument(_positive),
        metavar="K",
        help="the teacher is given as its top-K log-probs (a topk_ divergence; default topk_forward_kl_bucket)",
    )
    tune.add_argument("--vocab", type=_argument(_positive), metavar="V", help="student vocabulary size")
    tune.add_argument("--dtype", choices=_DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    tune.add_argument(
        "--divergence",
        type=_argument(_divergence),
        metavar="NAME",
        help=f"a built-in, e.g. jsd_beta0.3 (default: forward_kl, or topk_forward_kl_bucket with --teacher-topk; "
        f"one of {', '.join(registry.names())})",
    )
    tune.add_argument("--no-ce", dest="with_ce", action="store_false", help="no hard cross-entropy term")
    tune.add_argument(
        "--fp32-logits", action="store_true", help="tune for fused_linear_distill(fp32_logits=True) (16-bit dtypes)"
    )
    tune.add_argument(
        "--chunks",
        type=_argument(_positive_list),
        metavar="C[,C...]",
        help="candidate chunk sizes (default: powers of two from 256, or 64 for V < 32768, to min(8192, N bucket))",
    )
    tune.add_argument(
        "--memory-budget",
        type=_argument(parse_memory_budget),
        metavar="BUDGET",
        help="bytes (16GiB, 8e9) or a fraction of free device memory (0.5); default: KDFUSE_MEMORY_BUDGET",
    )


def _add_measurement_arguments(tune: argparse.ArgumentParser) -> None:
    """Where and how ``kdfuse tune`` measures, and what it prints."""
    tune.add_argument("--device", type=_argument(_device), help="default: the current CUDA device, else cpu")
    tune.add_argument("--impl", choices=("compile", "eager"), help="default: compile on CUDA, eager on CPU")
    tune.add_argument(
        "--warmup", type=_argument(_positive), default=3, help="untimed calls per candidate and round (3)"
    )
    tune.add_argument("--repeat", type=_argument(_positive), default=5, help="timed calls per candidate and round (5)")
    tune.add_argument(
        "--rounds",
        type=_argument(_positive),
        default=3,
        help="rounds over the candidates, interleaved so all share the GPU's clock drift; "
        "each candidate's median round counts (3)",
    )
    tune.add_argument("--force", action="store_true", help="measure even when the cache has the result")
    tune.add_argument("--json", action="store_true", help="print JSON instead of tables")
    tune.add_argument("--plot", metavar="FILE.png", help="draw time and memory vs chunk size (needs matplotlib)")


# --------------------------------------------------------------------------------------------
# kdfuse tune
# --------------------------------------------------------------------------------------------


def _divergence_of(args: argparse.Namespace) -> str:
    """``--divergence``, or the default for the teacher's form."""
    return args.divergence or ("topk_forward_kl_bucket" if args.teacher_topk else "forward_kl")


def _shape_keys(
    args: argparse.Namespace, device: torch.device, budget: int | None, impl: str
) -> list[tuple[tuple[int, ...], TuningKey]]:
    """(requested token counts, key) per distinct N bucket, in the order first requested."""
    preset = PRESETS[args.preset]
    teacher = "topk" if args.teacher_topk else "logits" if args.teacher_logits else "hidden"
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    by_key: dict[TuningKey, tuple[int, ...]] = {}
    for tokens in args.tokens or preset.tokens:
        key = make_key(
            rows=tokens,
            vocab=args.vocab or preset.vocab,
            student_hidden=args.student_hidden or preset.student_hidden,
            teacher=teacher,
            teacher_dim=args.teacher_topk or args.teacher_hidden or preset.teacher_hidden,
            dtype=getattr(torch, dtype),
            divergence=_divergence_of(args),
            with_ce=args.with_ce,
            with_grad=True,
            memory_budget=budget,
            impl=impl,
            fp32_logits=args.fp32_logits,
        )
        by_key[key] = (*by_key.get(key, ()), tokens)
    return [(tokens, key) for key, tokens in by_key.items()]


def _cache_hit(cache: TuningCache, key: TuningKey, candidates: tuple[int, ...]) -> Sweep | None:
    """A stored full sweep of exactly these candidates (an in-process, time-bounded one is not)."""
    hit = cached_sweep(cache, key)
    if hit is None or not hit.complete or {m.candidate for m in hit.measurements} != set(candidates):
        return None
    return hit


def _tune(
    shapes: list[tuple[tuple[int, ...], TuningKey]],
    args: argparse.Namespace,
    device: torch.device,
    cache: TuningCache,
    *,
    force: bool,
) -> list[ShapeResult]:
    """Cached sweeps as they are; every other shape measured, with a progress bar on stderr."""
    candidates = {key: args.chunks or candidate_chunk_sizes(key) for _, key in shapes}
    hits = {key: hit for key in candidates if not force and (hit := _cache_hit(cache, key, candidates[key]))}
    steps = sum(args.rounds * len(c) + 1 for key, c in candidates.items() if key not in hits)  # + 1: the GEMM floor
    if device.type == "cpu":
        _announce_duration({k: c for k, c in candidates.items() if k not in hits}, args, device)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    results = []
    with progress:
        task = progress.add_task("measuring", total=steps)
        for tokens, key in shapes:
            if key in hits:
                results.append(ShapeResult(tokens, hits[key], cached=True))
                continue
            progress.update(task, description=describe(key))
            sweep = run_sweep(
                key,
                device,
                candidates[key],
                distill=fused_linear_distill,
                warmup=args.warmup,
                repeat=args.repeat,
                rounds=args.rounds,
                on_step=lambda: progress.advance(task),
            )
            doubt = implausible(sweep)
            if doubt is not None:  # no winner is crowned (nor cached) from timings like these
                sweep = replace(sweep, best=None)
            elif sweep.best is not None:
                cache.put(key.as_dict(), sweep.to_entry())
            results.append(ShapeResult(tokens, sweep, cached=False, doubt=doubt))
    return results


# A step takes at least its GEMMs: a candidate faster than the floor by more than this was not
# timed right (a stubbed clock, a device that returned early); nor were candidates this far apart.
_FLOOR_SLACK, _SPREAD = 0.98, 60.0


def implausible(sweep: Sweep) -> str | None:
    """Why the sweep's timings cannot be trusted, or ``None``: a candidate faster than the GEMM
    floor, or candidates 60 times apart (a clock or a machine that changed under the sweep)."""
    times = [m.ms for m in sweep.measurements if math.isfinite(m.ms)]
    if not times:
        return None
    if sweep.floor_ms and min(times) < _FLOOR_SLACK * sweep.floor_ms:
        return f"a candidate took {min(times):.3f} ms, less than the GEMMs alone ({sweep.floor_ms:.3f} ms)"
    if max(times) > _SPREAD * min(times):
        return f"candidates took {min(times):.3f} to {max(times):.3f} ms, {max(times) / min(times):.0f} times apart"
    return None


def _announce_duration(candidates: dict[TuningKey, tuple[int, ...]], args: argparse.Namespace, device) -> None:
    """On a CPU a sweep of LLM shapes takes long: time one step of the first shape and say, on
    stderr, about how long the whole sweep will take (a step's time grows with N)."""
    if not candidates:
        return
    first, chunks = next(iter(candidates.items()))
    step = distill_step(build_problem(first, device), chunks[len(chunks) // 2], fused_linear_distill)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    calls = args.rounds * (args.warmup + args.repeat)
    total = sum(
        seconds * key.rows_bucket / first.rows_bucket * (calls * len(c) + args.warmup + args.repeat)
        for key, c in candidates.items()
    )
    if total > _ANNOUNCE_AFTER_S:
        runs = sum(args.rounds * len(c) for c in candidates.values())
        print(
            f"kdfuse tune: {runs} measurements of {calls // args.rounds} steps each, about {total / 60:.0f} min on "
            f"this CPU (one step of {describe(first)} took {seconds:.1f} s); --tokens, --chunks and --rounds "
            "shrink the sweep, Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )


_ANNOUNCE_AFTER_S = 30.0


def _ratio(ms: float, floor_ms: float | None) -> float | None:
    return ms / floor_ms if floor_ms and math.isfinite(ms) else None


def _summary(result: ShapeResult) -> str:
    sweep = result.sweep
    if result.doubt is not None:
        doubt = f"implausible timings ({result.doubt})"
        return f"{describe(sweep.key)}: warning: {doubt}: no chunk size chosen, nothing cached"
    if sweep.best is None:
        return f"{describe(sweep.key)}: no candidate succeeded; chunk_size='auto' keeps the heuristic"
    best = next(m for m in sweep.measurements if m.candidate == sweep.best)
    ratio = _ratio(best.ms, sweep.floor_ms)
    detail = f"{best.ms:.3f} ms" + ("" if ratio is None else f", {ratio:.2f}x floor")
    return f"{describe(sweep.key)}: chunk_size={sweep.best} ({detail}{', cached' if result.cached else ''})"


def _table(result: ShapeResult, device: torch.device) -> Table:
    sweep = result.sweep
    floor = "not measured" if sweep.floor_ms is None else f"{sweep.floor_ms:.3f} ms"
    caption = f"tokens {','.join(map(str, result.tokens))}; GEMM floor {floor}; ★ winner"
    caption += "; from the cache (--force measures again)" if result.cached else ""
    table = Table(title=describe(sweep.key), caption=caption)
    for name in ("", "chunk", "median ms", "× floor", "peak extra", "note"):
        table.add_column(name, justify="left" if name in ("", "note") else "right")
    for m in sweep.measurements:
        ratio = _ratio(m.ms, sweep.floor_ms)
        peak = format_bytes(m.peak_bytes) if device.type == "cuda" and math.isfinite(m.ms) else "-"
        won = m.candidate == sweep.best
        paired = sweep.contests.get(m.candidate)
        note = m.error or ("" if paired is None else f"paired: {paired:.3f}x the fastest")
        table.add_row(
            "★" if won else "",
            str(m.candidate),
            f"{m.ms:.3f}" if math.isfinite(m.ms) else "-",
            "-" if ratio is None else f"{ratio:.2f}",
            peak,
            note,
            style="bold green" if won else None,
        )
    return table


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _json(results: list[ShapeResult], cache: TuningCache, impl: str, device: torch.device) -> str:
    doc = {
        "device": cache.identity,
        "cache_path": str(cache.path),
        "impl": impl,
        "peak_memory_measured": device.type == "cuda",
        "shapes": [
            {
                "tokens": list(r.tokens),
                "key": r.sweep.key.as_dict(),
                "cached": r.cached,
                "complete": r.sweep.complete,
                "chunk_size": r.sweep.best,
                "floor_ms": r.sweep.floor_ms,
                "measurements": [
                    {
                        "chunk_size": m.candidate,
                        "ms": _finite(m.ms),
                        "x_floor": _ratio(m.ms, r.sweep.floor_ms),
                        "peak_bytes": m.peak_bytes,
                        "error": m.error,
                        "paired_ratio": r.sweep.contests.get(m.candidate),
                    }
                    for m in r.sweep.measurements
                ],
            }
            for r in results
        ],
    }
    return json.dumps(doc, indent=1, allow_nan=False)


def _plot(results: list[ShapeResult], path: str, device: torch.device) -> None:
    """Median time and peak extra memory vs chunk size, one line per shape, winners starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        done = [m for m in r.sweep.measurements if math.isfinite(m.ms)]
        chunks = [m.candidate for m in done]
        label = describe(r.sweep.key)
        (line,) = ax_time.plot(chunks, [m.ms for m in done], marker="o", label=label)
        ax_mem.plot(chunks, [m.peak_bytes / 2**20 for m in done], marker="o", label=label, color=line.get_color())
        best = [m for m in done if m.candidate == r.sweep.best]
        ax_time.plot(
            [m.candidate for m in best], [m.ms for m in best], marker="*", markersize=16, color=line.get_color()
        )
    fig.suptitle("\n".join(describe(r.sweep.key) for r in results), fontsize=8)
    ax_time.set(xlabel="chunk size", ylabel="median ms (fwd+bwd)", title="time (★ winner)")
    mem_title = "peak extra memory" if device.type == "cuda" else "peak extra memory (not measured on CPU)"
    ax_mem.set(xlabel="chunk size", ylabel="MiB", title=mem_title)
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_tune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'kdfuse[plot]'")
    if (args.teacher_topk is not None) != _divergence_of(args).startswith("topk_"):
        parser.error(
            "a top-k teacher (--teacher-topk) needs a topk_ divergence, and a topk_ divergence needs --teacher-topk"
        )
    cfg = settings()
    device = args.device or _device("cuda" if torch.cuda.is_available() else "cpu")
    impl = args.impl or ("compile" if device.type == "cuda" else "eager")
    budget = resolve_memory_budget(cfg.memory_budget if args.memory_budget is None else args.memory_budget, device)
    cache = open_cache(cfg.cache_dir, device)
    shapes = _shape_keys(args, device, budget, impl)
    results = _tune(shapes, args, device, cache, force=args.force or cfg.force_retune)
    if args.plot:
        _plot(results, args.plot, device)
    if args.json:
        print(_json(results, cache, impl, device))
        return 0
    console = Console()
    for result in results:
        console.print(_table(result, device))
    lines = [_summary(result) for result in results] + [f"cache: {cache.path}"]
    lines += [f"note: {_CPU_NOTE}"] if device.type == "cpu" and impl == "eager" else []
    lines += [f"plot: {args.plot}"] if args.plot else []
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    return 0


# --------------------------------------------------------------------------------------------
# kdfuse cache
# --------------------------------------------------------------------------------------------


def _stored_sweeps(cache: TuningCache) -> tuple[list[Sweep], int]:
    """The readable entries as sweeps, and how many could not be read."""
    sweeps, unreadable = [], 0
    for name, value in cache.entries().items():
        try:
            key = TuningKey(**json.loads(name))
        except (TypeError, ValueError):
            key = None
        sweep = None if key is None else Sweep.from_entry(key, value)
        if sweep is None:
            unreadable += 1
        else:
            sweeps.append(sweep)
    return sweeps, unreadable


def _cache_table(cache: TuningCache, sweeps: list[Sweep]) -> Table:
    table = Table(title=f"{cache.identity}: {len(sweeps)} entries", caption=str(cache.path))
    for name in ("shape", "chunk", "ms", "× floor", "sweep"):
        table.add_column(name, justify="left" if name in ("shape", "sweep") else "right")

    def order(s: Sweep) -> tuple[str, int]:  # shapes together, then by N
        return json.dumps({**s.key.as_dict(), "rows_bucket": None}, sort_keys=True), s.key.rows_bucket

    for s in sorted(sweeps, key=order):
        best = next((m for m in s.measurements if m.candidate == s.best), None)
        ms = "-" if best is None or not math.isfinite(best.ms) else f"{best.ms:.3f}"
        ratio = None if best is None else _ratio(best.ms, s.floor_ms)
        sweep = "full" if s.complete else "partial"
        table.add_row(describe(s.key), str(s.best), ms, "-" if ratio is None else f"{ratio:.2f}", sweep)
    return table


def _run_cache(args: argparse.Namespace) -> int:
    device = args.device or _device("cuda" if torch.cuda.is_available() else "cpu")
    cache = open_cache(settings().cache_dir, device)
    if args.action == "path":
        print(cache.path)
    elif args.action == "clear":
        existed = cache.path.exists()
        if existed:  # cleared under the cache's lock: a tune writing meanwhile would undo an unlink
            cache.clear()
        print(f"cleared {cache.path}" if existed else f"no cache file at {cache.path}")
    else:
        sweeps, unreadable = _stored_sweeps(cache)
        if sweeps:
            Console().print(_cache_table(cache, sweeps))
        else:
            print(f"no entries for {cache.identity} in {cache.path}")
        if unreadable:
            print(f"{unreadable} entries could not be read")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kdfuse`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return _run_tune(args, parser) if args.command == "tune" else _run_cache(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""Divergences: pure functions of two logit tensors, and the built-ins as data.

The contract (like FlexAttention's ``score_mod``) is the public type :data:`Divergence`::

    def divergence(student: Tensor,  # (R, V) temperature-scaled student logits
                   teacher: Tensor,  # (R, V) temperature-scaled teacher logits
                   ) -> Tensor:      # (R,) per-row loss
        ...

Both inputs arrive in the compute dtype (float32, or float64 for float64 inputs), already
soft-capped and divided by the temperature. The function must be pure (no in-place updates of its
inputs, no Python side effects, no data-dependent Python control flow) so that ``torch.compile``
can fuse it and ``torch.func`` can differentiate it. Any such function works with
:func:`kdfuse.fused_linear_distill`; gradients w.r.t. the student logits come from ``torch.func``.

A divergence with numeric parameters is a :class:`Parametrized`: its function takes the
parameters as 0-dim tensors after the logits, ``fn(student, teacher, *params)``, so a new value
reuses the compiled code (a closure over a Python float would be baked into the graph and
recompile for every value). :func:`parametrized` makes one from a user's function::

    def alpha_divergence(student, teacher, alpha):  # alpha: a 0-dim tensor
        ...

    div = divergences.parametrized(alpha_divergence, alpha=0.5)   # div.__name__: "alpha_divergence_alpha0.5"

Teacher logits of ``-inf`` mark vocabulary outside the teacher's support. Every built-in keeps
``0 · log 0 = 0`` and stays finite there; where a term would be ``p · log 0`` with ``p > 0`` (only
reverse-direction KL terms), the log-probability is floored at :data:`LOGPROB_FLOOR`, a large but
finite penalty that still pushes the student's mass off the masked tokens.

The built-ins are one table, :data:`BUILTINS`, of :class:`Builtin` entries (name, pure function,
parameters and defaults, the hand-written kernel that runs it); the factories (``jsd(beta=0.3)``)
build :class:`Parametrized` values with stable names (``"jsd_beta0.3"``) usable as registry and
cache keys, and :func:`get` turns such a name (or a bare name, meaning default parameters) back
into the divergence. ``kdfuse.registry`` joins this table with the top-k one (``kdfuse.topk``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .validate import check_unit

__all__ = [
    "BUILTINS",
    "LOGPROB_FLOOR",
    "Builtin",
    "Divergence",
    "Parametrized",
    "Terms",
    "forward_kl",
    "get",
    "jsd",
    "mse_logits",
    "names",
    "parametrized",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "soft_ce",
    "symmetric_kl",
    "tvd",
]

Divergence = Callable[[Tensor, Tensor], Tensor]
"""``(student (R, V), teacher (R, V)) -> (R,)``: see the module docstring."""

LOGPROB_FLOOR = -1.0e4
"""Floor for log-probabilities inside KL terms. Below about -104 (float32) or -745 (float64)
``exp`` is exactly 0 anyway, so flooring changes only ``p · log q`` terms with ``q = 0`` (a masked
teacher entry) from ``inf`` to ``1e4 · p``."""


# --------------------------------------------------------------------------------------------
# Parametrised divergences, and the table of built-ins.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parametrized:
    """A divergence whose function takes its numeric parameters as tensors.

    Calling it, ``div(student, teacher)`` (or ``div(student, ids, logprobs)`` for a top-k
    teacher, ``sparse=True``), calls ``fn(student, teacher, *args)`` with each of ``args`` as a
    0-dim tensor of the student's dtype and device. kdfuse compiles one chunk function per
    ``fn`` and passes ``args`` as data, so values that change between calls never recompile.
    Equal fields make equal values: ``jsd(0.3) == jsd(0.3)``.
    """

    fn: Callable[..., Tensor]
    args: tuple[float, ...] = ()
    name: str = ""
    sparse: bool = False

    def __call__(self, student: Tensor, *teacher: Tensor) -> Tensor:
        # torch.full, not torch.tensor: a fill kernel, not a host-to-device copy (a host sync).
        params = (torch.full((), v, dtype=student.dtype, device=student.device) for v in self.args)
        return self.fn(student, *teacher, *params)

    @property
    def __name__(self) -> str:
        """The stable name, as a function's (code that names divergences reads ``__name__``)."""
        return self.name or getattr(self.fn, "__name__", type(self.fn).__name__)

    def __repr__(self) -> str:
        return f"<divergence {self.__name__}>"


def _format_param(name: str, value: float) -> str:
    # ``:g`` (short: "beta0.3") when it round-trips through get(), else the exact repr: ``:g``
    # keeps 6 digits, so jsd(0.1234567) would be named (and rebuilt by get) as jsd(0.123457).
    text = f"{value:g}"
    return f"{name}{text if float(text) == value else repr(value)}"


def parametrized(
    fn: Callable[..., Tensor], *, name: str | None = None, sparse: bool = False, **params: float
) -> Parametrized:
    """``fn`` with ``params`` passed to it as 0-dim tensors, in the order given, so that changing
    them never recompiles (see :class:`Parametrized`). ``fn(student, teacher, *params) -> (R,)``;
    with ``sparse=True`` it takes a top-k teacher, ``fn(student, ids, logprobs, *params)``.

    The name (tuning-cache keys, messages) defaults to ``fn``'s name followed by the parameters,
    e.g. ``"alpha_divergence_alpha0.5"``."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    values = {}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"parameter {key} must be a finite number, got {value!r}")
        values[key] = float(value)
    if name is None:
        name = "_".join([getattr(fn, "__name__", type(fn).__name__), *(_format_param(k, v) for k, v in values.items())])
    return Parametrized(fn, tuple(values.values()), name, sparse)


@dataclass(frozen=True)
class Terms:
    """A divergence as a sum of per-entry terms: ``fn(student, teacher, *args)`` equals
    ``terms(x_s, x_t, *args)`` summed over the vocabulary (averaged with ``mean``), where x are
    the rows' log-probs (``of="logprobs"``) or the logits themselves (``of="logits"``). A
    divergence in this form can be computed over a vocabulary split across processes from a few
    numbers per row (kdfuse.vocab_parallel)."""

    fn: Callable[..., Tensor]  # (x_s (R, V), x_t (R, V), *args) -> (R, V)
    of: Literal["logprobs", "logits"] = "logprobs"
    mean: bool = False


def summed(terms: Terms, name: str) -> Callable[..., Tensor]:
    """The pure ``(student, teacher, *args) -> (R,)`` function that ``terms`` stands for."""

    def divergence(student: Tensor, teacher: Tensor, *args: Tensor) -> Tensor:
        if terms.of == "logprobs":
            student, teacher = student.log_softmax(-1), teacher.log_softmax(-1)
        values = terms.fn(student, teacher, *args)
        return values.mean(-1) if terms.mean else values.sum(-1)

    divergence.__name__ = divergence.__qualname__ = name
    return divergence


@dataclass(frozen=True)
class Builtin:
    """One built-in divergence: everything kdfuse knows about it, as data.

    ``fn`` is the pure function, taking the tensor arguments ``derive(*values)`` after the logits
    (the values of ``params``, each a number in [0, 1]; without ``derive`` the values themselves).
    ``endpoints`` lists parameter values where ``fn`` is replaced by another entry's function,
    exact there (JSD at β = 0 is forward KL). ``kernel`` names the hand-written CUDA kernel that
    runs ``fn`` (``kdfuse.triton_chunk``'s, or ``"topk"`` for ``kdfuse.triton_topk``), if any;
    ``reduced`` is a top-k entry's loss in the few numbers that kernel supplies; ``terms`` is a
    dense entry's math as per-entry terms (``fn`` is made from it, see :func:`separable`).
    Unlisted entries are only an endpoint's target."""

    name: str
    fn: Callable[..., Tensor]
    doc: str
    params: tuple[tuple[str, float], ...] = ()
    derive: Callable[..., tuple[float, ...]] | None = None
    endpoints: tuple[tuple[float, str], ...] = ()
    kernel: str | None = None
    sparse: bool = False
    reduced: Callable[..., Tensor] | None = None
    terms: Terms | None = None
    listed: bool = True


def separable(
    name: str, terms: Callable[..., Tensor], doc: str, of: str = "logprobs", mean: bool = False, **kw
) -> Builtin:
    """A dense :class:`Builtin` whose math is its per-entry ``terms`` (see :class:`Terms`)."""
    form = Terms(terms, of, mean)
    return Builtin(name, summed(form, name), doc, terms=form, **kw)


_built: dict[tuple, Parametrized] = {}


def build(table: Mapping[str, Builtin], name: str, *values: float) -> Parametrized:
    """The built-in ``name`` of ``table`` with its parameters at ``values`` (defaults for those
    not given), named ``"name"`` or ``"name_param<value>"``; the same object for the same
    arguments."""
    entry = table[name]
    if len(values) > len(entry.params):
        raise TypeError(f"{name} takes {len(entry.params)} parameters, got {len(values)}")
    values = tuple(check_unit(p, v) for (p, _), v in zip(entry.params, values))
    values += tuple(default for _, default in entry.params[len(values) :])
    memo = (id(table), name, values)
    if memo not in _built:
        _built[memo] = _build(table, entry, values)
    return _built[memo]


_built: dict[tuple, Parametrized] = {}


def _build(table: Mapping[str, Builtin], entry: Builtin, values: tuple[float, ...]) -> Parametrized:
    full = "_".join([entry.name, *(_format_param(p, v) for (p, _), v in zip(entry.params, values))])
    target = dict(entry.endpoints).get(values[0]) if values else None
    if target is not None:
        return Parametrized(table[target].fn, (), full, entry.sparse)
    args = entry.derive(*values) if entry.derive else values
    return Parametrized(entry.fn, tuple(args), full, entry.sparse)


_PARAM_NAME = re.compile(r"^(?P<base>[a-z_]+?)_(?P<param>[a-z]+)(?P<value>[-+0-9.eE]+)$")


def lookup(table: Mapping[str, Builtin], name: str, what: str = "divergence") -> Parametrized:
    """The built-in of ``table`` called ``name``: ``"forward_kl"``, ``"jsd"`` (default β) or
    ``"jsd_beta0.3"``; a ``ValueError`` listing the built-ins (and the nearest names) otherwise."""
    entry = table.get(name)
    if entry is not None and entry.listed:
        return build(table, name)
    match = _PARAM_NAME.match(name)
    if match and match["base"] in table:
        params = [p for p, _ in table[match["base"]].params]
        value = float(match["value"]) if params == [match["param"]] else math.nan
        if math.isfinite(value):
            return build(table, match["base"], value)
    listed = [n for n, e in table.items() if e.listed]
    near = _nearest(table, name, listed)
    hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
    raise ValueError(f"unknown {what} {name!r}{hint}; built-ins: {', '.join(sorted(listed))}")


def _nearest(table: Mapping[str, Builtin], name: str, listed: list[str]) -> list[str]:
    """The built-ins nearest a mistyped ``name``, a parametrised one (``jsd_bta0.3``) by its
    name without the value."""
    forms = {n: n for n in listed}
    forms.update({f"{n}_{p}": n for n in listed for p, _ in table[n].params})
    stem = re.sub(r"[-+0-9.eE]+$", "", name) or name
    return list(dict.fromkeys(forms[m] for m in difflib.get_close_matches(stem, forms, n=3)))


def table_of(entries: Sequence[Builtin]) -> dict[str, Builtin]:
    """``{name: entry}``, refusing a name given twice."""
    table = {e.name: e for e in entries}
    if len(table) != len(entries):
        raise ValueError("built-in names must be distinct")
    return table


# --------------------------------------------------------------------------------------------
# The math: pure, row-wise.
# --------------------------------------------------------------------------------------------


def _kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P‖Q)'s terms p (log p − log q), with 0·log 0 = 0 and log q floored.

    ``p`` comes from the unfloored ``logp`` (exact 0 where ``logp = -inf``); the difference uses
    floored values so neither the value nor any gradient ever sees ``inf - inf`` or ``0 · inf``.
    """
    p = logp.exp()
    return p * (logp.clamp_min(LOGPROB_FLOOR) - logq.clamp_min(LOGPROB_FLOOR))


def _log_mix(log_a: Tensor, log_b: Tensor, log_w: Tensor, log_1mw: Tensor) -> Tensor:
    """log(w · a + (1 − w) · b) in log space, from log w and log(1 − w); ``0 < w < 1``."""
    return torch.logaddexp(log_a + log_w, log_b + log_1mw)


# Each built-in's terms, one per vocabulary entry: functions of the student's and the teacher's
# log-probs (ls, lt), or of their logits for mse_logits; the divergence is their sum (mean) over
# the vocabulary (see Terms).


def _forward_kl_terms(ls: Tensor, lt: Tensor) -> Tensor:
    return _kl_terms(lt, ls)


def _reverse_kl_terms(ls: Tensor, lt: Tensor) -> Tensor:
    return _kl_terms(ls, lt)


def _jsd_terms(ls: Tensor, lt: Tensor, *mixing: Tensor) -> Tensor:
    """``mixing``: (β, 1 − β, log β, log(1 − β)), see _mixing."""
    beta, one_minus, log_beta, log_1m = mixing
    log_m = _log_mix(lt, ls, log_beta, log_1m)
    return beta * _kl_terms(lt, log_m) + one_minus * _kl_terms(ls, log_m)


def _soft_ce_terms(ls: Tensor, lt: Tensor) -> Tensor:
    return -(lt.exp() * ls.clamp_min(LOGPROB_FLOOR))


def _tvd_terms(ls: Tensor, lt: Tensor) -> Tensor:
    return 0.5 * (ls.exp() - lt.exp()).abs()


def _skew_kl_terms(ls: Tensor, lt: Tensor, *mixing: Tensor) -> Tensor:
    """``mixing``: (α, 1 − α, log α, log(1 − α)), see _mixing; only the logs are needed."""
    return _kl_terms(lt, _log_mix(lt, ls, *mixing[2:]))


def _skew_reverse_kl_terms(ls: Tensor, lt: Tensor, *mixing: Tensor) -> Tensor:
    """``mixing`` as for _skew_kl_terms."""
    return _kl_terms(ls, _log_mix(ls, lt, *mixing[2:]))


def _symmetric_kl_terms(ls: Tensor, lt: Tensor, weight: Tensor, one_minus: Tensor) -> Tensor:
    return weight * _kl_terms(lt, ls) + one_minus * _kl_terms(ls, lt)


def _mse_terms(s: Tensor, t: Tensor) -> Tensor:
    # A -inf teacher logit (outside the teacher's support) has no finite target: it contributes
    # 0 (and no gradient) instead of inf, as the module contract promises.
    return torch.where(t == float("-inf"), 0, s - t).square()


def _zero_terms(ls: Tensor, lt: Tensor) -> Tensor:
    # Depends on ``ls`` (times 0) so that torch.func returns a zero gradient, not an error.
    return ls * 0


def _mixing(w: float) -> tuple[float, ...]:
    """A mixing weight's kernel parameters (w, 1 − w, log w, log(1 − w)), computed here in float64.

    Kernels run in float32, where w = 1 − 1e-9 rounds to 1 and w = 1e-50 to 0: 1 − w and the logs
    taken there would be 0 and −inf (a NaN gradient next to a masked teacher entry, a wrong value
    for a tiny w). Each of the four is representable, so each is passed as its own value.
    """
    return (w, 1.0 - w, math.log(w), math.log1p(-w))


# --------------------------------------------------------------------------------------------
# The built-ins. Adding one: its math above, one entry here, its factory below.
# --------------------------------------------------------------------------------------------

BUILTINS: tuple[Builtin, ...] = (
    separable("forward_kl", _forward_kl_terms, "KL(P_t ‖ P_s) = Σ p_t (log p_t − log p_s), teacher entropy included.",
              kernel="forward_kl"),
    separable("reverse_kl", _reverse_kl_terms, "KL(P_s ‖ P_t) = Σ p_s (log p_s − log p_t); masked teachers floored.",
              kernel="reverse_kl"),
    separable("soft_ce", _soft_ce_terms, "−Σ p_t log p_s: forward KL plus the teacher's entropy (same gradient).",
              kernel="soft_ce"),
    separable("tvd", _tvd_terms, "½ Σ |p_s − p_t|, in [0, 1]."),
    separable("mse_logits", _mse_terms, "Mean over V of (s − t)² on the logits (metaseq); −inf teachers add 0.",
              of="logits", mean=True),
    separable("jsd", _jsd_terms, "β·KL(P_t ‖ M) + (1−β)·KL(P_s ‖ M), M = β·P_t + (1−β)·P_s.",
              params=(("beta", 0.5),), derive=_mixing, endpoints=((0.0, "forward_kl"), (1.0, "reverse_kl")),
              kernel="jsd"),
    separable("skew_kl", _skew_kl_terms, "KL(P_t ‖ α·P_t + (1−α)·P_s) (DistiLLM).",
              params=(("alpha", 0.1),), derive=_mixing, endpoints=((0.0, "forward_kl"), (1.0, "zero"))),
    separable("skew_reverse_kl", _skew_reverse_kl_terms, "KL(P_s ‖ α·P_s + (1−α)·P_t) (DistiLLM).",
              params=(("alpha", 0.1),), derive=_mixing, endpoints=((0.0, "reverse_kl"), (1.0, "zero"))),
    separable("symmetric_kl", _symmetric_kl_terms, "w·KL(P_t ‖ P_s) + (1−w)·KL(P_s ‖ P_t).",
              params=(("weight", 0.5),), derive=lambda w: (w, 1.0 - w)),
    separable("zero", _zero_terms, "Identically 0: skew KLs at α = 1.", listed=False),
)  # fmt: skip
_TABLE = table_of(BUILTINS)

forward_kl: Parametrized = build(_TABLE, "forward_kl")
"""KL(P_teacher ‖ P_student) = Σ p_t (log p_t − log p_s), teacher entropy included."""

reverse_kl: Parametrized = build(_TABLE, "reverse_kl")
"""KL(P_student ‖ P_teacher) = Σ p_s (log p_s − log p_t); masked teacher entries are floored at
:data:`LOGPROB_FLOOR`."""

soft_ce: Parametrized = build(_TABLE, "soft_ce")
"""Soft cross-entropy −Σ p_t log p_s. What torchtune, DistiLLM and OpenRLHF call "forward KL": it
equals forward KL plus the teacher's entropy, so same gradient, different value."""

tvd: Parametrized = build(_TABLE, "tvd")
"""Total variation distance ½ Σ |p_s − p_t| (in [0, 1])."""

mse_logits: Parametrized = build(_TABLE, "mse_logits")
"""Mean over the vocabulary of (s − t)² on the (temperature-scaled) logits, metaseq's
vocab-parallel MSE. Only meaningful for raw logits, not log-probabilities: logits are defined up
to a per-row shift that MSE does not ignore. Entries where the teacher logit is ``-inf`` (outside
its support) contribute 0."""


def jsd(beta: float = 0.5) -> Parametrized:
    """Generalized Jensen-Shannon divergence, Liger-Kernel's and TRL's convention.

    With M = β·P_t + (1−β)·P_s the loss is β·KL(P_t‖M) + (1−β)·KL(P_s‖M), computed in log space
    (log M by logaddexp), so β near 0 or 1 never evaluates 0·log 0 or log 0. It lies in
    [0, H(β)] with H(β) = −β log β − (1−β) log(1−β).

    The mixture formula tends to 0 at both ends; like Liger and TRL, ``beta=0`` is instead
    defined as forward KL(P_t‖P_s) and ``beta=1`` as reverse KL(P_s‖P_t), exactly.
    """
    return build(_TABLE, "jsd", beta)


def skew_kl(alpha: float = 0.1) -> Parametrized:
    """DistiLLM's skew KL: KL(P_t ‖ α·P_t + (1−α)·P_s). ``alpha=0`` is forward KL, ``1`` is 0."""
    return build(_TABLE, "skew_kl", alpha)


def skew_reverse_kl(alpha: float = 0.1) -> Parametrized:
    """DistiLLM's skew reverse KL: KL(P_s ‖ α·P_s + (1−α)·P_t). ``alpha=0`` is reverse KL, ``1`` is 0."""
    return build(_TABLE, "skew_reverse_kl", alpha)


def symmetric_kl(weight: float = 0.5) -> Parametrized:
    """w·KL(P_t‖P_s) + (1−w)·KL(P_s‖P_t): ``weight=1`` is forward KL, ``0`` reverse KL."""
    return build(_TABLE, "symmetric_kl", weight)


def names() -> list[str]:
    """Names accepted by :func:`get` with default parameters."""
    return sorted(name for name, entry in _TABLE.items() if entry.listed)


def get(name: str) -> Parametrized:
    """The built-in called ``name``: ``"forward_kl"``, ``"jsd"`` (default β) or ``"jsd_beta0.3"``."""
    return lookup(_TABLE, name)

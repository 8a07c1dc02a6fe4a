"""Divergences: pure functions of two logit tensors.

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

Teacher logits of ``-inf`` mark vocabulary outside the teacher's support. Every built-in keeps
``0 · log 0 = 0`` and stays finite there; where a term would be ``p · log 0`` with ``p > 0`` (only
reverse-direction KL terms), the log-probability is floored at :data:`LOGPROB_FLOOR`, a large but
finite penalty that still pushes the student's mass off the masked tokens.

Parametrised built-ins are factories (``jsd(beta=0.3)``) returning functions with stable
``__name__`` (``"jsd_beta0.3"``) usable as registry and cache keys; :func:`get` turns such a
name (or a bare built-in name, meaning default parameters) back into the function.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Callable, Protocol

import torch
from torch import Tensor

__all__ = [
    "Divergence",
    "LOGPROB_FLOOR",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "soft_ce",
    "tvd",
    "skew_kl",
    "skew_reverse_kl",
    "symmetric_kl",
    "mse_logits",
    "get",
    "names",
]

Divergence = Callable[[Tensor, Tensor], Tensor]
"""``(student (R, V), teacher (R, V)) -> (R,)``: see the module docstring."""

LOGPROB_FLOOR = -1.0e4
"""Floor for log-probabilities inside KL terms. Below about -104 (float32) or -745 (float64)
``exp`` is exactly 0 anyway, so flooring changes only ``p · log q`` terms with ``q = 0`` (a masked
teacher entry) from ``inf`` to ``1e4 · p``."""


class _Kernel(Protocol):
    def __call__(self, student: Tensor, teacher: Tensor, *params: Tensor) -> Tensor: ...


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Row-wise KL(P‖Q) from log-probabilities, with 0·log 0 = 0 and log q floored.

    ``p`` comes from the unfloored ``logp`` (exact 0 where ``logp = -inf``); the difference uses
    floored values so neither the value nor any gradient ever sees ``inf - inf`` or ``0 · inf``.
    """
    p = logp.exp()
    return (p * (logp.clamp_min(LOGPROB_FLOOR) - logq.clamp_min(LOGPROB_FLOOR))).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, log_w: Tensor, log_1mw: Tensor) -> Tensor:
    """log(w · a + (1 − w) · b) in log space, from log w and log(1 − w); ``0 < w < 1``."""
    return torch.logaddexp(log_a + log_w, log_b + log_1mw)


def _forward_kl(student: Tensor, teacher: Tensor) -> Tensor:
    return _kl(teacher.log_softmax(-1), student.log_softmax(-1))


def _reverse_kl(student: Tensor, teacher: Tensor) -> Tensor:
    return _kl(student.log_softmax(-1), teacher.log_softmax(-1))


def _jsd_mixture(student: Tensor, teacher: Tensor, *mixing: Tensor) -> Tensor:
    """``mixing``: (β, 1 − β, log β, log(1 − β)), see _mixing."""
    beta, one_minus, log_beta, log_1m = mixing
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    log_m = _log_mix(log_t, log_s, log_beta, log_1m)
    return beta * _kl(log_t, log_m) + one_minus * _kl(log_s, log_m)


def _soft_ce(student: Tensor, teacher: Tensor) -> Tensor:
    p_t = teacher.softmax(-1)
    return -(p_t * student.log_softmax(-1).clamp_min(LOGPROB_FLOOR)).sum(-1)


def _tvd(student: Tensor, teacher: Tensor) -> Tensor:
    return 0.5 * (student.softmax(-1) - teacher.softmax(-1)).abs().sum(-1)


def _skew_kl(student: Tensor, teacher: Tensor, *mixing: Tensor) -> Tensor:
    """``mixing``: (α, 1 − α, log α, log(1 − α)), see _mixing; only the logs are needed."""
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    return _kl(log_t, _log_mix(log_t, log_s, *mixing[2:]))


def _skew_reverse_kl(student: Tensor, teacher: Tensor, *mixing: Tensor) -> Tensor:
    """``mixing`` as for _skew_kl."""
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    return _kl(log_s, _log_mix(log_s, log_t, *mixing[2:]))


def _symmetric_kl(student: Tensor, teacher: Tensor, weight: Tensor, one_minus: Tensor) -> Tensor:
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    return weight * _kl(log_t, log_s) + one_minus * _kl(log_s, log_t)


def _mse_logits(student: Tensor, teacher: Tensor) -> Tensor:
    # A -inf teacher logit (outside the teacher's support) has no finite target: it contributes
    # 0 (and no gradient) instead of inf, as the module contract promises.
    diff = torch.where(teacher == float("-inf"), 0, student - teacher)
    return diff.square().mean(-1)


def _zero(student: Tensor, teacher: Tensor) -> Tensor:
    # Depends on ``student`` (times 0) so that torch.func returns a zero gradient, not an error.
    return student.sum(-1) * 0


def _mixing(w: float) -> tuple[float, ...]:
    """A mixing weight's kernel parameters (w, 1 − w, log w, log(1 − w)), computed here in float64.

    Kernels run in float32, where w = 1 − 1e-9 rounds to 1 and w = 1e-50 to 0: 1 − w and the logs
    taken there would be 0 and −inf (a NaN gradient next to a masked teacher entry, a wrong value
    for a tiny w). Each of the four is representable, so each is passed as its own value.
    """
    return (w, 1.0 - w, math.log(w), math.log1p(-w))


def _named(name: str, kernel: _Kernel, params: tuple[float, ...], doc: str | None) -> Divergence:
    """A plain ``(student, teacher) -> loss`` function with a stable name.

    ``__kdfuse_kernel__`` and ``__kdfuse_params__`` let the combinator call the kernel with the
    parameters as tensors, so that a new ``beta`` reuses the compiled code instead of
    recompiling (a closure over a Python float would be baked into the graph).
    """
    values = tuple(params)

    def divergence(student: Tensor, teacher: Tensor) -> Tensor:
        # torch.full, not torch.tensor: a fill kernel, not a host-to-device copy (a host sync).
        return kernel(student, teacher, *(torch.full((), v, dtype=student.dtype, device=student.device) for v in values))

    divergence.__name__ = divergence.__qualname__ = name
    divergence.__doc__ = doc
    divergence.__kdfuse_kernel__ = kernel  # type: ignore[attr-defined]
    divergence.__kdfuse_params__ = values  # type: ignore[attr-defined]
    return divergence


def _check_unit(name: str, value: float) -> float:
    # numbers.Real takes NumPy scalars too (np.float32(0.3)); the result is a Python float, so
    # the factory's name and cache key are the same as for 0.3.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _param_name(base: str, param: str, value: float) -> str:
    # ``:g`` (short: "jsd_beta0.3") when it round-trips through get(), else the exact repr: ``:g``
    # keeps 6 digits, so jsd(0.1234567) would be named (and rebuilt by get) as jsd(0.123457).
    text = f"{value:g}"
    return f"{base}_{param}{text if float(text) == value else repr(value)}"


forward_kl: Divergence = _named(
    "forward_kl",
    _forward_kl,
    (),
    """KL(P_teacher ‖ P_student) = Σ p_t (log p_t − log p_s), teacher entropy included.""",
)

reverse_kl: Divergence = _named(
    "reverse_kl",
    _reverse_kl,
    (),
    """KL(P_student ‖ P_teacher) = Σ p_s (log p_s − log p_t); masked teacher entries are floored
    at :data:`LOGPROB_FLOOR`.""",
)

soft_ce: Divergence = _named(
    "soft_ce",
    _soft_ce,
    (),
    """Soft cross-entropy −Σ p_t log p_s. What torchtune, DistiLLM and OpenRLHF call "forward KL":
    it equals forward KL plus the teacher's entropy, so same gradient, different value.""",
)

tvd: Divergence = _named(
    "tvd", _tvd, (), """Total variation distance ½ Σ |p_s − p_t| (in [0, 1])."""
)

mse_logits: Divergence = _named(
    "mse_logits",
    _mse_logits,
    (),
    """Mean over the vocabulary of (s − t)² on the (temperature-scaled) logits, metaseq's
    vocab-parallel MSE. Only meaningful for raw logits, not log-probabilities: logits are defined up
    to a per-row shift that MSE does not ignore, and log-probs squash the informative tail.
    Entries where the teacher logit is ``-inf`` (outside its support) contribute 0.""",
)


def jsd(beta: float = 0.5) -> Divergence:
    """Generalized Jensen-Shannon divergence, Liger-Kernel's and TRL's convention.

    With M = β·P_t + (1−β)·P_s the loss is β·KL(P_t‖M) + (1−β)·KL(P_s‖M), computed in log space
    (log M by logaddexp), so β near 0 or 1 never evaluates 0·log 0 or log 0. It lies in
    [0, H(β)] with H(β) = −β log β − (1−β) log(1−β).

    The mixture formula tends to 0 at both ends; like Liger and TRL, ``beta=0`` is instead
    defined as forward KL(P_t‖P_s) and ``beta=1`` as reverse KL(P_s‖P_t), exactly.
    """
    beta = _check_unit("beta", beta)
    name = _param_name("jsd", "beta", beta)
    if beta == 0.0:
        return _named(name, _forward_kl, (), jsd.__doc__)
    if beta == 1.0:
        return _named(name, _reverse_kl, (), jsd.__doc__)
    return _named(name, _jsd_mixture, _mixing(beta), jsd.__doc__)


def skew_kl(alpha: float = 0.1) -> Divergence:
    """DistiLLM's skew KL: KL(P_t ‖ α·P_t + (1−α)·P_s). ``alpha=0`` is forward KL."""
    alpha = _check_unit("alpha", alpha)
    name = _param_name("skew_kl", "alpha", alpha)
    if alpha == 0.0:
        return _named(name, _forward_kl, (), skew_kl.__doc__)
    if alpha == 1.0:  # the mixture is P_t itself: identically 0
        return _named(name, _zero, (), skew_kl.__doc__)
    return _named(name, _skew_kl, _mixing(alpha), skew_kl.__doc__)


def skew_reverse_kl(alpha: float = 0.1) -> Divergence:
    """DistiLLM's skew reverse KL: KL(P_s ‖ α·P_s + (1−α)·P_t). ``alpha=0`` is reverse KL."""
    alpha = _check_unit("alpha", alpha)
    name = _param_name("skew_reverse_kl", "alpha", alpha)
    if alpha == 0.0:
        return _named(name, _reverse_kl, (), skew_reverse_kl.__doc__)
    if alpha == 1.0:
        return _named(name, _zero, (), skew_reverse_kl.__doc__)
    return _named(name, _skew_reverse_kl, _mixing(alpha), skew_reverse_kl.__doc__)


def symmetric_kl(weight: float = 0.5) -> Divergence:
    """w·KL(P_t‖P_s) + (1−w)·KL(P_s‖P_t): ``weight=1`` is forward KL, ``0`` reverse KL."""
    weight = _check_unit("weight", weight)
    name = _param_name("symmetric_kl", "weight", weight)
    return _named(name, _symmetric_kl, (weight, 1.0 - weight), symmetric_kl.__doc__)


_PLAIN: dict[str, Divergence] = {f.__name__: f for f in (forward_kl, reverse_kl, soft_ce, tvd, mse_logits)}
_FACTORIES: dict[str, tuple[Callable[[float], Divergence], str]] = {
    "jsd": (jsd, "beta"),
    "skew_kl": (skew_kl, "alpha"),
    "skew_reverse_kl": (skew_reverse_kl, "alpha"),
    "symmetric_kl": (symmetric_kl, "weight"),
}
_PARAM_NAME = re.compile(r"^(?P<base>[a-z_]+?)_(?P<param>beta|alpha|weight)(?P<value>[-+0-9.eE]+)$")


def names() -> list[str]:
    """Names accepted by :func:`get` with default parameters."""
    return sorted([*_PLAIN, *_FACTORIES])


def get(name: str) -> Divergence:
    """The built-in called ``name``: ``"forward_kl"``, ``"jsd"`` (default β) or ``"jsd_beta0.3"``."""
    if name in _PLAIN:
        return _PLAIN[name]
    if name in _FACTORIES:
        return _FACTORIES[name][0]()
    match = _PARAM_NAME.match(name)
    if match and match["base"] in _FACTORIES:
        factory, param = _FACTORIES[match["base"]]
        if param == match["param"]:
            value = float(match["value"])
            if math.isfinite(value):
                return factory(value)
    raise ValueError(f"unknown divergence {name!r}; built-ins: {', '.join(names())}")

"""The one registry of divergences: the dense built-ins of :mod:`kdfuse.divergences` and the
top-k ones of :mod:`kdfuse.topk`, and how a call's ``divergence=`` argument becomes a
:class:`~kdfuse.divergences.Parametrized` value.

Everything that lists, names or dispatches on divergences (the combinator's fast kernels, the
tuner's memory estimate, the command line, the tests) reads :data:`ENTRIES`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from . import divergences as D
from . import topk as K
from .divergences import Builtin, Parametrized, lookup, table_of

__all__ = ["ENTRIES", "DivergenceLike", "entry_of", "get", "names", "resolve", "stable_name"]

DivergenceLike = str | Parametrized | Callable[..., Tensor]
"""What ``divergence=`` takes: a built-in's name, a :class:`~kdfuse.divergences.Parametrized`
(every built-in is one), or a plain pure function (dense or, with ``teacher_topk``, sparse)."""

ENTRIES: dict[str, Builtin] = table_of((*D.BUILTINS, *K.BUILTINS))
_BY_FN: dict[Callable[..., Tensor], Builtin] = {entry.fn: entry for entry in ENTRIES.values()}


def names(sparse: bool | None = None) -> list[str]:
    """The built-ins' names (dense, top-k or, by default, both), as :func:`get` takes them."""
    return sorted(n for n, e in ENTRIES.items() if e.listed and (sparse is None or e.sparse == sparse))


def get(name: str) -> Parametrized:
    """The built-in called ``name`` (``"jsd_beta0.3"``, ``"topk_soft_ce_bucket"``, ...)."""
    return lookup(ENTRIES, name)


def entry_of(fn: Callable[..., Tensor]) -> Builtin | None:
    """The built-in whose pure function ``fn`` is, if any (a user's function has none)."""
    return _BY_FN.get(fn)


def stable_name(divergence: DivergenceLike) -> str:
    """The divergence's name in tuning keys, the same in every process: a string as given, a
    :class:`Parametrized`'s or function's ``__name__`` (the factories' names carry their
    parameters), else the qualified name of the function a ``functools.partial`` wraps or of a
    callable object's type. Never its repr, which holds an address: every process would miss the
    cache and tune again."""
    if isinstance(divergence, str):
        return divergence
    name = getattr(divergence, "__name__", None)
    if isinstance(name, str):
        return name
    wrapped = getattr(divergence, "func", None)
    return getattr(wrapped, "__qualname__", None) or type(divergence).__qualname__


def resolve(divergence: DivergenceLike, sparse: bool) -> Parametrized:
    """``divergence`` as a :class:`Parametrized` for a dense (``sparse=False``) or top-k teacher;
    a ``ValueError`` when a built-in is for the other kind of teacher."""
    if isinstance(divergence, str):
        value = get(divergence)
    elif isinstance(divergence, Parametrized):
        value = divergence
    elif callable(divergence):
        value = Parametrized(divergence, (), stable_name(divergence), sparse)
    else:
        raise TypeError(f"divergence must be a name or a callable, got {type(divergence).__name__}")
    if sparse and not value.sparse:
        raise ValueError(
            "teacher_topk needs a sparse divergence from kdfuse.topk (e.g. 'topk_forward_kl_renormalize'), "
            f"got {value.__name__}"
        )
    if value.sparse and not sparse:
        raise ValueError(f"divergence {value.__name__} takes a top-k teacher: pass teacher_topk=(ids, logprobs)")
    return value

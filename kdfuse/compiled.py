"""``torch.compile`` of a function bound to one configuration, with a code object of its own.

Dynamo keeps its compiled graphs, their guards and its recompile count per *code object*. Bound
with ``functools.partial`` (or a closure), every configuration of one function shares the
function's code object, so all configurations of a process share Dynamo's recompile limit (8):
the ninth logged "hit config.recompile_limit" once and ran eagerly from then on. Each call of
:func:`compile_bound` makes a new code object, so each configuration gets its own cache and its
own limit, and the user's own compiled code is never touched (no global setting changes).
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable

import torch

__all__ = ["compile_bound"]

_serial = itertools.count()


def compile_bound(fn: Callable, *bound: object, compiled: bool = True, name: str = "kdfuse_chunk") -> Callable:
    """``lambda *args: fn(*bound, *args)``, compiled (``dynamic=False``: shapes are static unless
    marked, see ``torch._dynamo.maybe_mark_dynamic``) when ``compiled``, else as it is.

    The wrapper's code object is a copy named ``{name}_{n}``, unique in the process (its name
    shows in Dynamo's logs and profiles)."""

    def bound_call(*args):
        return fn(*bound, *args)

    if not compiled:
        return bound_call
    code = bound_call.__code__.replace(co_name=f"{name}_{next(_serial)}")
    own = types.FunctionType(code, bound_call.__globals__, code.co_name, None, bound_call.__closure__)
    return torch.compile(own, dynamic=False)

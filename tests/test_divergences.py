"""The built-in divergences against textbook formulas, and their documented invariants.

The textbook side works on probabilities in float64 with its own softmax, ``log`` and ``0·log 0 = 0``
(never the library's log-space helpers), so a mistake in a kernel cannot cancel out.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import floats
from hypothesis import given
from hypothesis import strategies as st

from kdfuse import divergences as D

F64 = torch.float64
INF = float("inf")


# --- textbook formulas (float64, probabilities) --------------------------------------------------


def probs(logits: torch.Tensor) -> torch.Tensor:
    z = logits - logits.max(-1, keepdim=True).values
    e = torch.exp(z)
    return e / e.sum(-1, keepdim=True)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ p log(p/q), 0·log(0/q) = 0 (and +inf where p > 0 = q)."""
    safe_p = torch.where(p > 0, p, 1.0)  # keeps the unused branch's gradient finite
    return torch.where(p > 0, p * (torch.log(safe_p) - torch.log(q)), 0.0).sum(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    safe_p = torch.where(p > 0, p, 1.0)
    return -torch.where(p > 0, p * torch.log(safe_p), 0.0).sum(-1)


def jsd_textbook(ps, pt, beta):
    if beta == 0.0:  # documented: exactly forward KL (the mixture formula would give 0)
        return kl(pt, ps)
    if beta == 1.0:  # documented: exactly reverse KL
        return kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def H(beta: float) -> float:
    """Binary entropy: the maximum of the β-JSD."""
    return -sum(x * math.log(x) for x in (beta, 1 - beta) if x > 0)


# (name, factory(param) -> divergence, textbook(s, t, param), param strategy or None)
UNIT = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-6, 1 - 1e-6]), st.floats(0.0, 1.0))
BUILTINS = [
    ("forward_kl", lambda _: D.forward_kl, lambda s, t, _: kl(probs(t), probs(s)), None),
    ("reverse_kl", lambda _: D.reverse_kl, lambda s, t, _: kl(probs(s), probs(t)), None),
    ("jsd", D.jsd, lambda s, t, b: jsd_textbook(probs(s), probs(t), b), UNIT),
    ("soft_ce", lambda _: D.soft_ce, lambda s, t, _: -(probs(t) * torch.log(probs(s))).sum(-1), None),
    ("tvd", lambda _: D.tvd, lambda s, t, _: 0.5 * (probs(s) - probs(t)).abs().sum(-1), None),
    ("skew_kl", D.skew_kl, lambda s, t, a: kl(probs(t), a * probs(t) + (1 - a) * probs(s)), UNIT),
    ("skew_reverse_kl", D.skew_reverse_kl, lambda s, t, a: kl(probs(s), a * probs(s) + (1 - a) * probs(t)), UNIT),
    (
        "symmetric_kl",
        D.symmetric_kl,
        lambda s, t, w: w * kl(probs(t), probs(s)) + (1 - w) * kl(probs(s), probs(t)),
        UNIT,
    ),
    ("mse_logits", lambda _: D.mse_logits, lambda s, t, _: ((s - t) ** 2).mean(-1), None),
]
IDS = [b[0] for b in BUILTINS]


@st.composite
def logit_pairs(draw, max_scale: float = 20.0):
    """(student, teacher) float64 logits of shape (R, V), drawn entry by entry: values in
    [-3, 3] times a drawn scale, each tensor shifted by a drawn constant."""
    rows = draw(st.integers(1, 4), label="rows")
    vocab = draw(st.sampled_from([1, 2, 3, 7, 16, 31, 50]), label="V")
    scale = draw(st.sampled_from([s for s in (0.1, 1.0, 3.0, 8.0, 20.0) if s <= max_scale]), label="scale")
    s = draw(floats((rows, vocab), 3.0), label="student") * scale
    t = draw(floats((rows, vocab), 3.0), label="teacher") * scale
    # Logits are shift-invariant per row for all but mse_logits; shift to exercise that too.
    return s + draw(st.floats(-50, 50), label="student shift"), t + draw(st.floats(-50, 50), label="teacher shift")


def student_grad(div, s, t):
    return torch.func.grad(lambda x: div(x, t).sum())(s)


def textbook_grad(fn, s, t, param):
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x, t, param).sum(), x)
    return g


def close(actual, expected, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# --- against the textbook ------------------------------------------------------------------------


@pytest.mark.parametrize("name,factory,textbook,param_st", BUILTINS, ids=IDS)
@given(data=st.data())
def test_builtin_matches_textbook_value_and_gradient(name, factory, textbook, param_st, data):
    s, t = data.draw(logit_pairs())
    param = None if param_st is None else data.draw(param_st, label="param")
    div = factory(param)
    value = div(s, t)
    assert value.shape == (s.shape[0],) and value.dtype == F64
    close(value, textbook(s, t, param), atol=1e-10 * (1 + value.abs().max().item()))
    g, expected = student_grad(div, s, t), textbook_grad(textbook, s, t, param)
    if name == "tvd":
        # Where p_s = p_t in some entry (always at V = 1: |1 - 1|) the row sits on the kink of
        # abs: no defined gradient to compare (each side's rounding picks its own side of it).
        smooth = ((probs(s) - probs(t)).abs() > 1e-12).all(-1)
        g, expected = g[smooth], expected[smooth]
    close(g, expected, atol=1e-10 * (1 + (g.abs().max().item() if g.numel() else 0.0)))


@pytest.mark.parametrize("name,factory,textbook,param_st", BUILTINS, ids=IDS)
def test_builtin_hand_computed_value(name, factory, textbook, param_st):
    """One fixed case checked against numbers worked out by hand (guards the textbook helpers)."""
    # p_s = (1/2, 1/2), p_t = (1/4, 3/4), parameter 1/2 where there is one.
    s = torch.tensor([[0.0, 0.0]], dtype=F64)
    t = torch.tensor([[0.0, math.log(3.0)]], dtype=F64)
    fkl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    rkl = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    m = (3 / 8, 5 / 8)  # (p_s + p_t) / 2
    jsd = 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    expected = {
        "forward_kl": fkl,
        "reverse_kl": rkl,
        "jsd": jsd,
        "soft_ce": -math.log(0.5),
        "tvd": 0.25,
        "skew_kl": 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]),
        "skew_reverse_kl": 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]),
        "symmetric_kl": 0.5 * fkl + 0.5 * rkl,
        "mse_logits": math.log(3.0) ** 2 / 2,
    }[name]
    div = factory(0.5)
    close(div(s, t), torch.tensor([expected], dtype=F64))
    close(textbook(s, t, 0.5), torch.tensor([expected], dtype=F64))


# --- invariants ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,factory,textbook,param_st", BUILTINS, ids=IDS)
@given(data=st.data())
def test_divergence_of_a_distribution_from_itself(name, factory, textbook, param_st, data):
    s, _ = data.draw(logit_pairs())
    div = factory(None if param_st is None else data.draw(param_st, label="param"))
    shifted = s + data.draw(st.floats(-30, 30), label="shift")  # same distribution
    if name == "soft_ce":
        # −Σ p log p: the teacher's entropy, not 0.
        close(div(s, shifted), entropy(probs(s)), atol=1e-10)
    elif name == "mse_logits":
        close(div(s, s), torch.zeros(s.shape[0], dtype=F64), atol=0.0)
    else:
        close(div(s, shifted), torch.zeros(s.shape[0], dtype=F64), atol=1e-10)
        if name != "tvd":  # tvd's |·| has a kink there; the others a smooth minimum
            assert student_grad(div, s, shifted).abs().max() < 1e-9


@pytest.mark.parametrize("name,factory,textbook,param_st", [b for b in BUILTINS if b[0] != "mse_logits"], ids=IDS[:-1])
@given(data=st.data())
def test_probability_divergences_ignore_per_row_logit_shifts(name, factory, textbook, param_st, data):
    s, t = data.draw(logit_pairs())
    div = factory(None if param_st is None else data.draw(param_st, label="param"))
    shift_s = torch.tensor(data.draw(st.lists(st.floats(-40, 40), min_size=s.shape[0], max_size=s.shape[0])), dtype=F64)
    shift_t = torch.tensor(data.draw(st.lists(st.floats(-40, 40), min_size=s.shape[0], max_size=s.shape[0])), dtype=F64)
    value = div(s, t)
    close(div(s + shift_s[:, None], t + shift_t[:, None]), value, atol=1e-10 * (1 + value.abs().max().item()))


@pytest.mark.parametrize(
    "div", [D.forward_kl, D.reverse_kl, D.skew_kl(0.1), D.skew_kl(0.9), D.skew_reverse_kl(0.3), D.symmetric_kl(0.2)]
)
@given(pair=logit_pairs())
def test_kl_family_is_nonnegative(div, pair):
    s, t = pair
    assert (div(s, t) >= -1e-12).all()


@given(pair=logit_pairs(), beta=UNIT)
def test_jsd_lies_between_zero_and_binary_entropy(pair, beta):
    s, t = pair
    value = D.jsd(beta)(s, t)
    assert torch.isfinite(value).all()
    assert (value >= -1e-12).all()
    if 0.0 < beta < 1.0:  # the endpoints are KL, unbounded
        assert (value <= H(beta) * (1 + 1e-9) + 1e-12).all()


def test_jsd_reaches_its_bound_on_disjoint_supports():
    # Disjoint supports: the β-JSD equals H(β) exactly (its maximum), so the bound is tight.
    # (exp(-1000) is exactly 0 in float64.)
    s = torch.tensor([[0.0, -1000.0]], dtype=F64)
    t = torch.tensor([[-1000.0, 0.0]], dtype=F64)
    for beta in (0.1, 0.5, 0.8):
        close(D.jsd(beta)(t, s), torch.tensor([H(beta)], dtype=F64))


@given(pair=logit_pairs())
def test_tvd_lies_in_unit_interval(pair):
    s, t = pair
    value = D.tvd(s, t)
    assert ((value >= 0) & (value <= 1 + 1e-12)).all()


@given(pair=logit_pairs())
def test_jsd_endpoints_are_exactly_the_kls(pair):
    s, t = pair
    assert torch.equal(D.jsd(0.0)(s, t), D.forward_kl(s, t))
    assert torch.equal(D.jsd(1.0)(s, t), D.reverse_kl(s, t))
    assert torch.equal(student_grad(D.jsd(0.0), s, t), student_grad(D.forward_kl, s, t))
    assert torch.equal(student_grad(D.jsd(1.0), s, t), student_grad(D.reverse_kl, s, t))
    # skew_kl(0) is forward KL, skew_reverse_kl(0) reverse KL, symmetric_kl(1)/(0) the two KLs.
    assert torch.equal(D.skew_kl(0.0)(s, t), D.forward_kl(s, t))
    assert torch.equal(D.skew_reverse_kl(0.0)(s, t), D.reverse_kl(s, t))
    close(D.symmetric_kl(1.0)(s, t), D.forward_kl(s, t), atol=0.0, rtol=0.0)
    close(D.symmetric_kl(0.0)(s, t), D.reverse_kl(s, t), atol=0.0, rtol=0.0)
    # skew_*(1): the mixture is the distribution itself, identically 0 with a zero gradient.
    for div in (D.skew_kl(1.0), D.skew_reverse_kl(1.0)):
        assert torch.equal(div(s, t), torch.zeros(s.shape[0], dtype=F64))
        assert torch.equal(student_grad(div, s, t), torch.zeros_like(s))


@given(pair=logit_pairs(max_scale=1.0))
def test_jsd_near_the_endpoints(pair):
    """β = ε: finite, tends to 0 like ε·KL(P_t‖P_s) (and like ε·KL(P_s‖P_t) at β = 1 − ε)."""
    s, t = pair
    eps = 1e-6
    near0, near1 = D.jsd(eps)(s, t), D.jsd(1 - eps)(s, t)
    for value in (near0, near1):
        assert torch.isfinite(value).all()
        assert ((value >= -1e-15) & (value <= H(eps) * (1 + 1e-6))).all()
    # JSD_β = β·KL(t‖s) + O(β²·χ²): the leading-order limit, relative error ~ε·χ²/KL. Absolute:
    # jsd(ε) sums p·(log p − log m) over O(1) log-probabilities, so it carries a float64 error of
    # ~1e-16 that dividing by ε magnifies to ~1e-10 (visible when KL itself is ~1e-7).
    fkl, rkl = D.forward_kl(s, t), D.reverse_kl(s, t)
    close(near0 / eps, fkl, rtol=1e-4, atol=1e-15 / eps)
    close(near1 / eps, rkl, rtol=1e-4, atol=1e-15 / eps)
    # ... and so do the gradients (the O(ε) correction is relative to the gradient's scale).
    for div, limit in ((D.jsd(eps), D.forward_kl), (D.jsd(1 - eps), D.reverse_kl)):
        expected = student_grad(limit, s, t)
        close(student_grad(div, s, t) / eps, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item() + 1e-15 / eps)
    # Finite at any logit scale too.
    for div in (D.jsd(eps), D.jsd(1 - eps)):
        big = div(s * 50, t * 50)
        assert torch.isfinite(big).all() and torch.isfinite(student_grad(div, s * 50, t * 50)).all()


@given(pair=logit_pairs())
def test_soft_ce_is_forward_kl_plus_teacher_entropy(pair):
    s, t = pair
    diff = D.soft_ce(s, t) - D.forward_kl(s, t)
    close(diff, entropy(probs(t)), atol=1e-10 * (1 + diff.abs().max().item()))
    close(student_grad(D.soft_ce, s, t), student_grad(D.forward_kl, s, t), atol=1e-12)


# --- teacher -inf entries (outside the teacher's support) ----------------------------------------


ALL_BUILTINS = [
    D.forward_kl,
    D.reverse_kl,
    D.soft_ce,
    D.tvd,
    D.mse_logits,
    *(D.jsd(b) for b in (0.0, 1e-6, 0.3, 0.5, 1 - 1e-6, 1.0)),
    *(D.skew_kl(a) for a in (0.0, 0.1, 0.7, 1.0)),
    *(D.skew_reverse_kl(a) for a in (0.0, 0.1, 0.7, 1.0)),
    *(D.symmetric_kl(w) for w in (0.0, 0.3, 1.0)),
]


def masked_pair(seed: int, rows: int = 3, vocab: int = 9):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=gen, dtype=F64) * 2
    t = torch.randn(rows, vocab, generator=gen, dtype=F64) * 2
    mask = torch.rand(rows, vocab, generator=gen) < 0.4
    mask[:, 0] = False  # at least one token in the support
    mask[0, 1:] = True  # and one one-hot teacher row
    return s, t.masked_fill(mask, -INF), mask


@pytest.mark.parametrize("div", ALL_BUILTINS, ids=lambda d: d.__name__)
@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_minus_inf_gives_finite_loss_and_gradient(div, seed):
    s, t, _ = masked_pair(seed)
    value = div(s, t)
    grad = student_grad(div, s, t)
    assert torch.isfinite(value).all(), value
    assert torch.isfinite(grad).all(), grad
    # Finite under the compute-dtype path too.
    assert torch.isfinite(div(s.float(), t.float())).all()
    assert torch.isfinite(student_grad(div, s.float(), t.float())).all()


@pytest.mark.parametrize("name,factory,textbook,param_st", BUILTINS, ids=IDS)
@pytest.mark.parametrize("param", [0.3])
def test_teacher_minus_inf_matches_textbook_where_finite(name, factory, textbook, param_st, param):
    """Where the textbook value is finite (0·log 0 = 0), the built-in equals it; the reverse
    direction's p·log 0 is floored at LOGPROB_FLOOR as documented."""
    s, t, mask = masked_pair(3)
    div = factory(param)
    value, grad = div(s, t), student_grad(div, s, t)
    ps = probs(s)
    if name == "mse_logits":  # masked entries contribute 0 (and no gradient)
        expected = torch.where(mask, 0.0, (s - t.masked_fill(mask, 0.0)) ** 2).mean(-1)
        close(value, expected)
        assert (grad[mask] == 0).all()
        return
    if name in ("reverse_kl", "symmetric_kl"):
        w = 1.0 if name == "reverse_kl" else 1 - param
        # Σ over masked v of p_s(v)·(log p_s(v) − FLOOR), on top of the other terms.
        penalty = (ps * (torch.log(ps) - D.LOGPROB_FLOOR) * mask).sum(-1)
        support = torch.where(mask, 0.0, ps * (torch.log(ps) - torch.log(probs(t)))).sum(-1)
        expected = w * (support + penalty)
        if name == "symmetric_kl":
            expected = expected + param * kl(probs(t), ps)
        close(value, expected, rtol=1e-9, atol=1e-9)
        # The penalty pushes student mass off the masked tokens.
        assert (grad[mask] > 0).all()
        return
    close(value, textbook(s, t, param), atol=1e-10)
    close(grad, textbook_grad(textbook, s, t, param), atol=1e-10)


def test_one_hot_teacher_forward_kl_is_student_nll():
    s = torch.tensor([[1.0, 2.0, 0.5]], dtype=F64)
    t = torch.tensor([[-INF, 0.0, -INF]], dtype=F64)
    close(D.forward_kl(s, t), -torch.log(probs(s))[:, 1])
    close(D.soft_ce(s, t), -torch.log(probs(s))[:, 1])


# --- names, registry, parameter checks -----------------------------------------------------------


def test_stable_names():
    assert D.jsd(0.3).__name__ == "jsd_beta0.3"
    assert D.jsd().__name__ == "jsd_beta0.5"
    assert D.jsd(0).__name__ == "jsd_beta0"
    assert D.jsd(1).__name__ == "jsd_beta1"
    assert D.skew_kl(0.1).__name__ == "skew_kl_alpha0.1"
    assert D.skew_reverse_kl(0.25).__name__ == "skew_reverse_kl_alpha0.25"
    assert D.symmetric_kl(0.7).__name__ == "symmetric_kl_weight0.7"
    assert D.jsd(1e-6).__name__ == "jsd_beta1e-06"
    for f in (D.forward_kl, D.reverse_kl, D.soft_ce, D.tvd, D.mse_logits):
        assert D.get(f.__name__) is f
    # Same parameter, same name (usable as a cache key); different parameter, different name.
    assert D.jsd(0.3).__name__ == D.jsd(0.30000).__name__
    assert D.jsd(0.3).__name__ != D.jsd(0.31).__name__


def test_names_lists_every_builtin_and_get_accepts_them():
    assert D.names() == sorted(
        [
            "forward_kl",
            "reverse_kl",
            "soft_ce",
            "tvd",
            "mse_logits",
            "jsd",
            "skew_kl",
            "skew_reverse_kl",
            "symmetric_kl",
        ]
    )
    s = torch.randn(2, 5, dtype=F64)
    t = torch.randn(2, 5, dtype=F64)
    defaults = {
        "jsd": D.jsd(0.5),
        "skew_kl": D.skew_kl(0.1),
        "skew_reverse_kl": D.skew_reverse_kl(0.1),
        "symmetric_kl": D.symmetric_kl(0.5),
    }
    for name in D.names():
        fn = D.get(name)
        if name in defaults:
            assert fn.__name__ == defaults[name].__name__
            assert torch.equal(fn(s, t), defaults[name](s, t))


@pytest.mark.parametrize("factory", [D.jsd, D.skew_kl, D.skew_reverse_kl, D.symmetric_kl])
@given(value=UNIT)
def test_get_round_trips_parametrised_names(factory, value):
    fn = factory(value)
    back = D.get(fn.__name__)
    assert back.__name__ == fn.__name__
    assert back.fn is fn.fn
    assert back.args == fn.args  # exact: the name loses no digits
    s, t = torch.randn(2, 6, dtype=F64), torch.randn(2, 6, dtype=F64)
    assert torch.equal(back(s, t), fn(s, t))


@pytest.mark.parametrize(
    "name",
    [
        "foo",
        "",
        "JSD",
        "forward-kl",
        "jsd_beta",
        "jsd_alpha0.3",
        "skew_kl_beta0.1",
        "forward_kl_beta0.3",
        "jsd_beta1.5",
        "jsd_beta-0.1",
        "jsd_betanan",
        "jsd_betainf",
        "jsd_beta0.3x",
        "nope_beta0.3",
    ],
)
def test_get_rejects_unknown_names(name):
    with pytest.raises(ValueError):
        D.get(name)


@pytest.mark.parametrize("factory", [D.jsd, D.skew_kl, D.skew_reverse_kl, D.symmetric_kl])
@pytest.mark.parametrize("value", [-0.1, -1e-9, -1e-12, 1.0 + 1e-9, 1.5, 2.0, float("nan"), INF, -INF])
def test_parameters_outside_unit_interval_raise(factory, value):
    param = {D.jsd: "beta", D.symmetric_kl: "weight"}.get(factory, "alpha")
    with pytest.raises(ValueError, match=rf"{param} must be in \[0, 1\], got {value!r}"):
        factory(value)


def test_divergence_parameter_bool_is_refused():
    with pytest.raises((TypeError, ValueError), match="beta"):
        D.jsd(True)


def test_factories_take_numpy_scalars():
    """np.float32(0.25) is the number 0.25: the same divergence (name, kernel and parameters,
    so the same compile and tuning keys) as 0.25."""
    import numpy as np

    assert D.jsd(np.float32(0.25)).__name__ == D.jsd(0.25).__name__ == "jsd_beta0.25"
    assert D.jsd(np.float32(0.25)) is D.jsd(0.25)
    with pytest.raises(TypeError, match="beta"):
        D.jsd(np.bool_(True))

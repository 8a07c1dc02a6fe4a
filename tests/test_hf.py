"""kdfuse.hf against the loss from the models' own logits: tiny randomly initialised transformers
models built here (no downloads), each model's logit post-processing included."""

from __future__ import annotations

import pytest
import torch

import kdfuse
from kdfuse import divergences as D
from kdfuse import hf

transformers = pytest.importorskip("transformers")

V, H = 96, 32
COMMON = dict(
    hidden_size=H,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _build(kind: str, vocab: int, seed: int, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **COMMON, **config))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=vocab, **COMMON, **config))
    elif kind == "gemma2":
        cfg = transformers.Gemma2Config(vocab_size=vocab, head_dim=8, final_logit_softcapping=4.0, **COMMON, **config)
        model = transformers.Gemma2ForCausalLM(cfg)
    elif kind == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(vocab_size=vocab, logit_scale=0.4, **COMMON))
    else:
        cfg = transformers.GraniteConfig(vocab_size=vocab, logits_scaling=3.0, **COMMON, **config)
        model = transformers.GraniteForCausalLM(cfg)
    return model.float()


PAIRS = {
    "llama": ("llama", {}, "llama", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}, "llama", {}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}, "qwen2", {"tie_word_embeddings": True}),
    "gemma2": ("gemma2", {}, "gemma2", {}),
    "cohere": ("cohere", {}, "llama", {}),
    "granite": ("granite", {}, "cohere", {}),
}


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return ids, mask


def _from_logits(student, teacher, ids, mask, labels=None, **options):
    """The loss from the models' own logits, through kdfuse's float64 reference on them (the
    logits as hidden states of an identity lm_head): next-token aligned, teacher cut to V."""
    logits = student(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, : logits.shape[-1]]
    if labels is None:
        labels = ids.masked_fill(mask == 0, -100)
    targets = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # a padding position predicts nothing
    eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
    return kdfuse.fused_linear_distill_ref(
        logits[:, :-1], eye, teacher_logits=teacher_logits, labels=targets, **options
    )


def _grads(model, loss) -> dict:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_loss_and_every_student_gradient_equal_the_models_logits(pair):
    s_kind, s_config, t_kind, t_config = PAIRS[pair]
    student = _build(s_kind, V, seed=1, **s_config)
    teacher = _build(t_kind, V + 8, seed=2, **t_config)  # a larger (padded) teacher vocabulary
    ids, mask = _batch()
    options = dict(divergence=D.jsd(0.3), temperature=2.0, hard_weight=0.5, soft_weight=0.5, chunk_size=5, impl="eager")
    got = hf.distill(student, teacher, ids, attention_mask=mask, **options)
    want = _from_logits(student, teacher, ids, mask, **options)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got_grads, want_grads = _grads(student, got), _grads(student, want.float())
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        w = want_grads[name]
        if w is None:
            assert g is None or not g.any(), name
            continue
        # float32 model, float32 loss math on one side and float64 on the other: the gradient of
        # each parameter agrees to a few float32 roundings, relative to its size.
        err = (g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)
        assert err < 1e-4, (name, err.item())


def test_tied_embeddings_get_both_gradients():
    """A tied lm_head is the input embedding: its gradient is the sum of both uses."""
    student = _build("qwen2", V, seed=1, tie_word_embeddings=True)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    teacher = _build("llama", V, seed=2)
    ids, mask = _batch(1)
    loss = hf.distill(student, teacher, ids, attention_mask=mask, impl="eager")
    (g,) = torch.autograd.grad(loss, [student.get_input_embeddings().weight])
    want = _from_logits(student, teacher, ids, mask, impl="eager")
    (w,) = torch.autograd.grad(want.float(), [student.get_input_embeddings().weight])
    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("config", "scale", "softcap"),
    [
        (dict(logit_scale=0.25), 0.25, None),
        (dict(output_multiplier=2.0), 2.0, None),
        (dict(lm_head_multiplier=3.0), 3.0, None),
        (dict(logits_scaling=4.0), 0.25, None),
        (dict(logits_scaling=4.0, model_type="hyperclovax"), 4.0, None),
        (dict(final_logit_softcapping=30.0), 1.0, 30.0),
        (dict(logit_scale=None, logits_scaling=2.0), 0.5, None),
        ({}, 1.0, None),
    ],
)
def test_logit_transforms_read_every_scale_name(config, scale, softcap):
    """The names TRL 1.16's DistillationTrainer reads, in its order (a multiplier first)."""
    model = torch.nn.Module()
    model.config = type("Config", (), config)()
    assert hf.logit_transforms(model) == (scale, softcap)


def test_labels_in_transformers_convention():
    """Labels are unshifted with -100 ignored; a hard CE term and explicit labels."""
    student, teacher = _build("llama", V, seed=3), _build("llama", V, seed=4)
    ids, mask = _batch(2)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt's tokens are not learned
    options = dict(hard_weight=1.0, soft_weight=0.2, reduction="sum", impl="eager", chunk_size=4)
    got = hf.distill(student, teacher, ids, attention_mask=mask, labels=labels, **options)
    want = _from_logits(student, teacher, ids, mask, labels=labels, **options)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_padding_positions_predict_nothing():
    """Right padding: the targets are padding. Left padding: the last pad's position would
    predict the first real token (transformers' own loss counts it); it is ignored too."""
    student, teacher = _build("llama", V, seed=3), _build("llama", V, seed=4)
    ids, mask = _batch(2)  # row 1: 3 pads on the right; row 2: 2 on the left
    rows = hf.distill(student, teacher, ids, attention_mask=mask, reduction="none", impl="eager")
    assert rows.shape == (3, 8)
    counted = rows != 0
    assert counted[0].all()
    assert counted[1].tolist() == [True] * 5 + [False] * 3
    assert counted[2].tolist() == [False] * 2 + [True] * 6


def test_a_peft_model_is_unwrapped():
    """A PEFT ``PeftModel`` wraps the causal LM (``get_base_model()``); the loss is the LM's."""

    class Wrapper(torch.nn.Module):  # what kdfuse.hf reads of a PeftModel
        def __init__(self, model):
            super().__init__()
            self.model = model

        def get_base_model(self):
            return self.model

    student, teacher = _build("llama", V, seed=3), _build("llama", V, seed=4)
    ids, mask = _batch(4)
    got = hf.distill(Wrapper(student), Wrapper(teacher), ids, attention_mask=mask, impl="eager")
    torch.testing.assert_close(got, hf.distill(student, teacher, ids, attention_mask=mask, impl="eager"))


def test_hf_distill_compiled():
    """impl="compile" (the default): the same loss."""
    student, teacher = _build("gemma2", V, seed=5), _build("gemma2", V, seed=6)
    ids, mask = _batch(3)
    got = hf.distill(student, teacher, ids, attention_mask=mask, divergence="reverse_kl")
    want = _from_logits(student, teacher, ids, mask, divergence="reverse_kl")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)

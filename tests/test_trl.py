"""kdfuse.trl against TRL 1.16's own functions (trl is an optional extra: skipped without it), and
TRL's DistillationTrainer run with and without the swap."""

from __future__ import annotations

import os

import pytest
import torch

import kdfuse.trl

trl = pytest.importorskip("trl")
distillation = pytest.importorskip("trl.trainer.distillation_trainer")
gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")

B, K, HS, HT, V = 3, 7, 12, 10, 37


def _inputs(seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    mask = (torch.rand(B, K, generator=gen) < 0.7).long()
    mask[0, 0] = 1
    tensors = dict(
        student_hidden_states=randn(B, K, HS),
        teacher_hidden_states=randn(B, K, HT),
        student_lm_head_weight=randn(V, HS, scale=0.5),
        teacher_lm_head_weight=randn(V, HT, scale=0.5),
        completion_mask=mask,
    )
    if bias:
        tensors.update(student_lm_head_bias=randn(V), teacher_lm_head_bias=randn(V))
    return tensors


STUDENT = ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")


def _run(fn, tensors: dict, **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items() if k in STUDENT}
    loss, entropy_sum, n_valid = fn(**{**tensors, **leaves}, **kwargs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss, entropy_sum, n_valid, dict(zip(leaves, grads))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta=0.0),
        dict(beta=1.0, temperature=2.0),
        dict(beta=0.3, num_items_in_batch=torch.tensor(9.0)),
        dict(beta=0.7, student_logit_scale=0.5, teacher_logit_scale=2.0, num_items_in_batch=11),
        dict(beta=0.5, student_final_logit_softcapping=3.0, teacher_final_logit_softcapping=5.0, temperature=0.7),
        dict(beta=0.5, bias=True),
    ],
    ids=["fkl", "rkl-T2", "jsd0.3-items", "jsd0.7-scales", "softcaps", "bias"],
)
def test_chunked_divergence_loss_equals_trls(kwargs):
    kwargs = dict(kwargs)
    tensors = _inputs(seed=len(kwargs), bias=kwargs.pop("bias", False))
    want = _run(distillation._chunked_divergence_loss, tensors, **kwargs)
    got = _run(kdfuse.trl.chunked_divergence_loss, tensors, **kwargs)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=2e-6)  # loss (TRL: float32 math)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=2e-5)  # entropy summed over tokens
    assert got[2].dtype == want[2].dtype == torch.int64 and got[2] == want[2]
    assert got[0].dim() == got[1].dim() == got[2].dim() == 0 and not got[1].requires_grad
    for name, g in got[3].items():
        torch.testing.assert_close(g, want[3][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fp32_logits_match_trls_bf16_loss(beta):
    """bf16 inputs: TRL's kernel keeps float32 logits, and so does kdfuse with fp32_logits=True
    (the same loss to float32 rounding); kdfuse's default bf16 logits are measurably further."""
    tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in _inputs(seed=3, bias=False).items()}
    tensors["student_lm_head_weight"] = tensors["student_lm_head_weight"] * 8  # logits of ~10: bf16 steps of 2^-4
    want = _run(distillation._chunked_divergence_loss, tensors, beta=beta)
    wide = _run(kdfuse.trl.chunked_divergence_loss, tensors, beta=beta, fp32_logits=True)
    narrow = _run(kdfuse.trl.chunked_divergence_loss, tensors, beta=beta)
    wide_err, narrow_err = ((got[0] - want[0]).abs().item() / want[0].item() for got in (wide, narrow))
    # measured: float32 logits 7e-8 to 2e-7 from TRL's, bf16 logits 2e-6 (jsd0.5) to 2e-4
    assert wide_err < 1e-6 and narrow_err > 5 * wide_err, (wide_err, narrow_err)


def test_bf16_heads_with_float32_biases():
    """Mixed precision (FSDP2 casts a weight, not always its bias): bf16 hidden states and heads,
    float32 biases, as TRL accepts them; the same loss to bf16 logits' rounding."""
    tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in _inputs(seed=4, bias=True).items()}
    tensors.update({k: v.float() for k, v in tensors.items() if k.endswith("bias")})
    want = _run(distillation._chunked_divergence_loss, tensors, beta=0.5)
    got = _run(kdfuse.trl.chunked_divergence_loss, tensors, beta=0.5, fp32_logits=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=1e-3)  # (biases rounded to bf16 here)
    assert got[3]["student_lm_head_bias"].dtype == torch.float32


def test_zero_items_keep_a_finite_entropy():
    """num_items_in_batch=0 divides the loss by zero, as TRL does; the entropy sum stays finite."""
    tensors = _inputs(seed=5, bias=False)
    want = distillation._chunked_divergence_loss(**tensors, beta=0.5, num_items_in_batch=0)
    got = kdfuse.trl.chunked_divergence_loss(**tensors, beta=0.5, num_items_in_batch=0)
    assert torch.isinf(got[0]) and torch.isinf(want[0])
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=2e-5)


def test_patch_can_keep_float32_logits():
    unpatch = kdfuse.trl.patch(fp32_logits=True)
    try:
        swapped = distillation._chunked_divergence_loss
        assert swapped.func is kdfuse.trl.chunked_divergence_loss and swapped.keywords == {"fp32_logits": True}
    finally:
        unpatch()


def test_a_fully_masked_batch_gives_zero():
    tensors = _inputs(seed=3, bias=False)
    tensors["completion_mask"] = torch.zeros(B, K, dtype=torch.long)
    loss, entropy_sum, n_valid, _ = _run(kdfuse.trl.chunked_divergence_loss, tensors, beta=0.5)
    assert loss.item() == 0.0 and entropy_sum.item() == 0.0 and n_valid.item() == 0


def _logits(seed: int):
    gen = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 6, V, generator=gen) * 2, torch.randn(2, 6, V, generator=gen) * 2
    labels = torch.randint(0, V, (2, 6), generator=gen)
    labels[0, :2] = -100
    return student, teacher, labels


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none", "elementwise"])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_generalized_jsd_loss_equals_gkds(reduction, beta, with_labels):
    student, teacher, labels = _logits(seed=int(beta * 10))
    labels = labels if with_labels else None
    for num_items in (None, torch.tensor(5.0)):
        kwargs = dict(labels=labels, beta=beta, temperature=1.5, reduction=reduction, num_items_in_batch=num_items)
        s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
        want = gkd.GKDTrainer.generalized_jsd_loss(s1, teacher, **kwargs)
        got = kdfuse.trl.generalized_jsd_loss(s2, teacher, **kwargs)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        (gw,) = torch.autograd.grad(want.sum(), s1)
        (gg,) = torch.autograd.grad(got.sum(), s2)
        torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-7)


def test_patch_swaps_and_restores():
    before = distillation._chunked_divergence_loss, gkd.GKDTrainer.generalized_jsd_loss
    unpatch = kdfuse.trl.patch()
    try:
        assert distillation._chunked_divergence_loss is kdfuse.trl.chunked_divergence_loss
        assert gkd.GKDTrainer.generalized_jsd_loss is kdfuse.trl.generalized_jsd_loss
    finally:
        unpatch()
    assert (distillation._chunked_divergence_loss, gkd.GKDTrainer.generalized_jsd_loss) == before


# --------------------------------------------------------------------------------------------
# TRL's DistillationTrainer for a few steps, with and without the swap.
# --------------------------------------------------------------------------------------------


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate([*specials, *(f"w{i}" for i in range(60))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
    )


def _model(hidden: int, vocab: int, seed: int, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config)


def _train(tmp_path, swapped: bool) -> list[float]:
    from datasets import Dataset

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = _tokenizer()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(16):
        prompt = torch.randint(0, 60, (5,), generator=gen).tolist()
        completion = torch.randint(0, 60, (4,), generator=gen).tolist()
        rows.append({"prompt": " ".join(f"w{i}" for i in prompt), "completion": " ".join(f"w{i}" for i in completion)})

    class OffPolicy(distillation.DistillationTrainer):
        """The dataset's completions instead of sampled ones: both runs see the same tokens."""

        def _generate_and_score_completions(self, inputs):
            self._completions = [x["completion"] for x in inputs]
            return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            return self.processing_class(text=self._completions, add_special_tokens=False)["input_ids"]

    args = trl.DistillationConfig(
        output_dir=str(tmp_path / ("kdfuse" if swapped else "trl")),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        max_completion_length=4,
        beta=0.5,
        temperature=1.0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    unpatch = kdfuse.trl.patch() if swapped else (lambda: None)
    try:
        trainer = OffPolicy(
            model=_model(32, len(tok), 0, tok),
            teacher_model=_model(48, len(tok), 1, tok),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
        )
        trainer.train()
    finally:
        unpatch()
    return [(h["loss"], h["entropy"]) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_distillation_trainer_loss_curves_match(tmp_path, monkeypatch):
    """Four steps of TRL's DistillationTrainer (JSD β = 0.5) on tiny models: the same losses and
    entropies with TRL's kernel and with kdfuse's, step by step; the swapped run called kdfuse's."""
    calls = []
    loss = kdfuse.trl.chunked_divergence_loss
    monkeypatch.setattr(kdfuse.trl, "chunked_divergence_loss", lambda *a, **k: (calls.append(1), loss(*a, **k))[1])
    theirs = _train(tmp_path, swapped=False)
    assert not calls
    ours = _train(tmp_path, swapped=True)
    assert len(calls) >= 4, calls
    assert len(theirs) == len(ours) == 4
    for (loss_t, ent_t), (loss_k, ent_k) in zip(theirs, ours):
        assert loss_k == pytest.approx(loss_t, rel=1e-4, abs=1e-7)
        assert ent_k == pytest.approx(ent_t, rel=1e-4)

"""Distillation between Hugging Face causal LMs, never materialising their logits.

``kdfuse.hf.distill(student, teacher, input_ids)`` runs both models' bodies to their last
hidden states (the teacher's under ``torch.no_grad``), and computes
:func:`kdfuse.fused_linear_distill` from those and the models' output embeddings, with each
model's own logit post-processing read from its config. It equals the loss computed from the
models' own ``.logits`` (tests/test_hf.py checks Llama, Qwen2 tied and untied, Gemma-2 and
Cohere): position i predicts token i + 1; ``labels`` are in transformers' convention
(unshifted, -100 ignored; padding positions predict nothing); a teacher vocabulary larger than
the student's (padded embedding tables) is cut to the student's.

transformers is an optional dependency (``pip install 'kdfuse[hf]'``); this module does not
import it: it reads the models' attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .fused import fused_linear_distill

__all__ = ["distill", "last_hidden_state", "logit_transforms"]

# The config attributes transformers models scale their logits by, in the order TRL 1.16 reads
# them: Cohere's logit_scale, Muse Glimmer's output_multiplier and Falcon-H1's
# lm_head_multiplier multiply; Granite's (and MiniCPM3's) logits_scaling divides, except for
# HyperCLOVA X, which multiplies by it.
_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transforms(model: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) of a transformers model's logits: ``logits = softcap(scale · lm_head(h))``,
    from its (text) config; (1.0, None) for a plain lm_head."""
    config = _text_config(model)
    scale = 1.0
    for name in _MULTIPLIERS:
        if getattr(config, name, None) is not None:
            scale = float(getattr(config, name))
            break
    else:
        scaling = getattr(config, "logits_scaling", None)
        if scaling is not None:
            multiply = getattr(config, "model_type", None) in _MULTIPLYING_LOGITS_SCALING
            scale = float(scaling) if multiply else 1.0 / float(scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, None if softcap is None else float(softcap)


def last_hidden_state(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The model's last hidden states (B, T, H), final norm included: its body (``base_model``:
    ``model.model`` of a ``*ForCausalLM``) without the lm_head, so no logits are computed."""
    body = model.base_model if model.base_model is not model else model.model
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _shifted_labels(
    input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None, ignore_index: int
) -> Tensor:
    """(B, T − 1) targets of positions 0 .. T − 2: ``labels`` (default ``input_ids``, padding
    ignored) shifted left by one, transformers' convention; a position that is itself padding
    predicts nothing (with left padding, transformers' own loss counts the last pad's prediction
    of the first real token: its hidden state saw no real token)."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    targets = labels[:, 1:]
    return targets if attention_mask is None else targets.masked_fill(attention_mask[:, :-1] == 0, ignore_index)


def _unwrapped(model: nn.Module) -> nn.Module:
    """A PEFT ``PeftModel``'s causal LM (adapters included), whose body ``last_hidden_state`` runs;
    any other model as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def distill(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: Tensor,  # (B, T)
    *,
    attention_mask: Tensor | None = None,  # (B, T), 0 on padding
    labels: Tensor | None = None,  # (B, T), unshifted, -100 ignored; default: input_ids, padding ignored
    **options: Any,
) -> Any:
    """The distillation loss of ``student`` against ``teacher`` on ``input_ids``, as
    :func:`kdfuse.fused_linear_distill` with ``options`` (its loss options: ``divergence``,
    ``temperature``, ``soft_weight``, ``hard_weight``, ``reduction``, ``normalizer``, ...).

    Each model's logit scale and ``final_logit_softcapping`` come from its config
    (:func:`logit_transforms`), as defaults that ``options`` may override. Tied input and
    output embeddings get the gradient of both their uses. A PEFT model is unwrapped to its
    causal LM (adapters included). The teacher runs in the mode it is in: call
    ``teacher.eval()`` once (as TRL does) so that its dropout is off."""
    student, teacher = _unwrapped(student), _unwrapped(teacher)
    ignore_index = options.get("ignore_index", -100)
    targets = _shifted_labels(input_ids, attention_mask, labels, ignore_index)
    student_hidden = last_hidden_state(student, input_ids, attention_mask)[:, :-1]
    with torch.no_grad():
        teacher_hidden = last_hidden_state(teacher, input_ids, attention_mask)[:, :-1]
    (s_weight, s_bias), (t_weight, t_bias) = _head(student), _head(teacher)
    (s_scale, s_cap), (t_scale, t_cap) = logit_transforms(student), logit_transforms(teacher)
    defaults: Mapping[str, Any] = {
        "student_logit_scale": s_scale,
        "teacher_logit_scale": t_scale,
        "student_softcap": s_cap,
        "teacher_softcap": t_cap,
        "student_bias": s_bias,
        "teacher_bias": None if t_bias is None else t_bias.detach(),
    }
    return fused_linear_distill(
        student_hidden, s_weight, teacher_hidden, t_weight.detach(), labels=targets, **{**defaults, **options}
    )

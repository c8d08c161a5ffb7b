"""Switching a model to the shared-prefix forward, and refusing the ones it cannot serve exactly."""

from __future__ import annotations

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .attention import ATTENTION_NAME, register_attention
from .collator import PACKED_KEY, PackingOptions, PrefixSharedPreferenceCollator
from .packed_forward import install_packed_forward


class UnsupportedModelError(ValueError):
    """The model cannot be trained exactly with prefix sharing."""


def check_architecture(model: torch.nn.Module) -> None:
    """Refuse, before any training, the architectures whose attention the packed kernels cannot reproduce."""
    name = type(model).__name__
    if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        raise UnsupportedModelError(
            f"{name} does not route its attention through transformers' `AttentionInterface`, so the packed "
            "attention cannot be installed. Use the stock TRL trainer for this model."
        )
    text_config = model.config.get_text_config()
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(
            f"{name} soft-caps its attention logits (`attn_logit_softcapping`), which the packed kernels do not "
            "implement. Use the stock TRL trainer for this model."
        )


def enable_prefix_sharing(model: torch.nn.Module, kernel: str) -> None:
    """Switch ``model`` (a causal LM already patched by TRL's ``add_fused_lm_head``) to the packed forward."""
    check_architecture(model)
    register_attention()
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    install_packed_forward(model, kernel)


def _probe_batch(vocab_size: int, kernel: str) -> dict:
    """Two prompts with two responses each, of uneven lengths, from low token ids."""
    high = max(3, min(vocab_size, 200))
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, high, (n,), generator=generator).tolist()

    examples = [
        {"prompt_ids": tokens(7), "chosen_ids": tokens(3), "rejected_ids": tokens(5)},
        {"prompt_ids": tokens(4), "chosen_ids": tokens(6), "rejected_ids": tokens(2)},
    ]
    collator = PrefixSharedPreferenceCollator(
        DataCollatorForPreference(pad_token_id=0), pad_token_id=0, options=PackingOptions(sdpa_buckets=kernel == "sdpa")
    )
    return collator(examples)


@torch.no_grad()
def verify_packed_forward(model: torch.nn.Module, kernel: str, device: torch.device) -> None:
    """Score a probe batch packed and unpacked; raise if the two disagree beyond the dtype's rounding.

    Catches architectures whose attention or positions do not follow the layout (for instance a model that drops
    unknown keyword arguments, or derives positions from the mask).
    """
    vocab_size = model.get_output_embeddings().weight.shape[0]
    batch = _probe_batch(vocab_size, kernel)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch[PACKED_KEY] = _to_device(batch[PACKED_KEY], device)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    was_training = model.training
    model.eval()
    try:
        unpacked = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        ).log_probs
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
            **{PACKED_KEY: batch[PACKED_KEY]},
        ).log_probs
    finally:
        model.train(was_training)
    dtype = next(model.parameters()).dtype
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    difference = float((packed.float() - unpacked.float()).abs().max())
    if not difference <= tolerance:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the packed forward differs from the unpacked one by {difference:.3g} in "
            f"log-probability (allowed {tolerance}), so prefix sharing would train on wrong numbers. Use the stock "
            "TRL trainer for this model, or report the architecture."
        )


def _to_device(value, device: torch.device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value

"""Switching a model to the shared-prefix forward, and refusing the ones it cannot serve exactly."""

from __future__ import annotations

import contextlib

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_prefix_share.core.attention import ATTENTION_NAME, register_attention
from trl_prefix_share.core.layout import move_to_device
from trl_prefix_share.core.mixers.kinds import compute_precision
from trl_prefix_share.core.mixers.segmented import install_segmented_mixers
from trl_prefix_share.core.model_structure import ModelStructure, inspect_model, stamp_layer_windows
from trl_prefix_share.core.packed_forward import install_packed_forward
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions
from trl_prefix_share.core.preference.collator import PrefixSharedPreferenceCollator
from trl_prefix_share.core.preference.prompt_groups import GroupByPrompt
from trl_prefix_share.core.tested_versions import with_drift_note
from trl_prefix_share.core.tree_support import probe_packing
from trl_prefix_share.core.vision.model_kinds import vision_support


class UnsupportedModelError(ValueError):
    """The model cannot be trained exactly with prefix sharing. On a transformers newer than the newest tested, the
    message names both versions (`tested_versions.with_drift_note`)."""

    def __init__(self, message: str) -> None:
        super().__init__(with_drift_note(message))


def check_architecture(model: torch.nn.Module) -> ModelStructure:
    """The structural check: raise ``UnsupportedModelError`` naming every layer rule the packed path cannot serve."""
    structure = inspect_model(model)
    if not structure.served:
        raise UnsupportedModelError(structure.describe())
    return structure


def enable_prefix_sharing(model: torch.nn.Module, kernel: str) -> None:
    """Switch ``model`` (a causal LM already patched by TRL's ``add_fused_lm_head``) to the packed forward."""
    switch_attention(model)
    install_packed_forward(model, kernel)


def enable_vision_prefix_sharing(model: torch.nn.Module, kernel: str) -> None:
    """``enable_prefix_sharing`` for image data: the vision-language structural check first (``vision.model_kinds``)."""
    support = vision_support(model)
    if not support.served:
        raise UnsupportedModelError(f"{support.reason}; image inputs cannot be shared")
    enable_prefix_sharing(model, kernel)


def switch_attention(model: torch.nn.Module) -> None:
    """Check the structure, stamp each layer's window, and select the packed attention (remembering the old one)."""
    structure = check_architecture(model)
    stamp_layer_windows(model, structure.windows)
    install_segmented_mixers(model)
    register_attention()
    if model.config._attn_implementation != ATTENTION_NAME:
        model._prefix_share_previous_attention = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)


def restore_attention(model: torch.nn.Module) -> None:
    """Undo ``switch_attention`` (after a failed probe): the model computes exactly as before. The forward wrapper
    stays but is inert: it acts only on batches that carry a packed layout, which the stock collator never makes."""
    previous = model.__dict__.pop("_prefix_share_previous_attention", None)
    if previous is not None:
        model.set_attn_implementation(previous)


# -- the construction probe --------------------------------------------------------------------------------------------

#: Sliding windows are clipped to this many positions while probing, so short probe sequences cross them.
PROBE_WINDOW = 5
#: Probe tolerance: this many times the model's own float noise (the same sequences scored padded vs alone) ...
NOISE_MULTIPLE = 8.0
#: ... and at least this many units of the dtype's rounding of the largest log-probability.
ROUNDING_UNITS = 4.0


def _probe_examples(vocab_size: int) -> list[dict[str, list[int]]]:
    """Three prompts; one has two pairs (four distinct responses: a K=4 document); lengths cross PROBE_WINDOW."""
    high = max(3, min(vocab_size, 200))
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, high, (n,), generator=generator).tolist()

    head = tokens(3)  # common to every prompt: a two-level prefix tree where the model takes trees
    long_prompt, short_prompt, tiny_prompt = head + tokens(10), head + tokens(1), tokens(2)
    return [
        {"prompt_ids": long_prompt, "chosen_ids": tokens(9), "rejected_ids": tokens(5)},
        {"prompt_ids": short_prompt, "chosen_ids": tokens(3), "rejected_ids": tokens(11)},
        {"prompt_ids": long_prompt, "chosen_ids": tokens(12), "rejected_ids": tokens(7)},
        {"prompt_ids": tiny_prompt, "chosen_ids": tokens(6), "rejected_ids": tokens(8)},
    ]


def _probe_batch(vocab_size: int, options: PackingOptions) -> dict:
    """Several documents in one row, one with K=4 branches (grouped by prompt), padded stock rows alongside."""
    collator = PrefixSharedPreferenceCollator(
        DataCollatorForPreference(pad_token_id=0),
        pad_token_id=0,
        options=options,
        group_documents=GroupByPrompt(),
    )
    return collator(_probe_examples(vocab_size))


@contextlib.contextmanager
def clipped_windows(model: torch.nn.Module, limit: int = PROBE_WINDOW):
    """Temporarily shrink every sliding window to ``limit`` (config, layer attributes and stamps alike), so that the
    probe's short sequences reach past it in the stock mask and the packed kernel both."""
    saved: list[tuple[object, str, object]] = []

    def shrink(owner: object, name: str) -> None:
        value = getattr(owner, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            saved.append((owner, name, value))
            setattr(owner, name, limit)

    shrink(model.config.get_text_config(), "sliding_window")
    for module in model.modules():
        shrink(module, "sliding_window")
        shrink(module, "prefix_share_window")
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def probe_tolerance(stock: torch.Tensor, alone: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> float:
    """How far packed may be from stock: a multiple of the model's own noise between two stock arrangements of the same
    sequences, floored by the dtype's rounding. A wrong context moves log-probs far beyond both, even at init."""
    noise = float((stock - alone)[mask].abs().max()) if bool(mask.any()) else 0.0
    scale = max(float(stock[mask].abs().max()) if bool(mask.any()) else 1.0, 1.0)
    return max(NOISE_MULTIPLE * noise, ROUNDING_UNITS * torch.finfo(dtype).eps * scale)


def _score(model: torch.nn.Module, input_ids, attention_mask, labels, **extra) -> torch.Tensor:
    return model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False, **extra
    ).log_probs.float()


@torch.no_grad()
def verify_packed_forward(model: torch.nn.Module, kernel: str, device: torch.device) -> None:
    """Score a probe batch packed and unpacked; raise if they disagree beyond the model's own float noise.

    The probe has several documents in one row, a prompt with four responses, and sliding windows clipped below
    its lengths. Catches what the structural check cannot see: a model that drops unknown keyword arguments,
    derives positions from the mask, or mixes positions in a layer that does not look like one.
    """
    vocab_size = model.get_output_embeddings().weight.shape[0]
    batch = move_to_device(_probe_batch(vocab_size, probe_packing(model, kernel)), device)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    mask = labels[:, 1:] != -100
    was_training = model.training
    model.eval()
    try:
        with clipped_windows(model):
            stock = _score(model, batch["input_ids"], batch["attention_mask"], labels)
            alone = torch.zeros_like(stock)
            for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
                piece = slice(0, length)
                scored = _score(model, batch["input_ids"][row : row + 1, piece], None, labels[row : row + 1, piece])
                alone[row, : length - 1] = scored[0]
            packed = _score(
                model, batch["input_ids"], batch["attention_mask"], labels, **{PACKED_KEY: batch[PACKED_KEY]}
            )
    finally:
        model.train(was_training)
    check_probe(model, packed, stock, alone, mask, "the packed forward differs from the unpacked one on the probe")


def check_probe(model, packed, stock, reference, mask, what: str) -> None:
    """Raise ``UnsupportedModelError`` when packed and stock log-probs differ beyond the probe tolerance (the model's
    own noise between ``stock`` and ``reference``, two stock arrangements of the same sequences)."""
    tolerance = probe_tolerance(stock, reference, mask, compute_precision(model))
    difference = float((packed - stock)[mask].abs().max())
    if not difference <= tolerance:
        raise UnsupportedModelError(
            f"{type(model).__name__}: {what} by {difference:.3g} in log-probability (allowed {tolerance:.3g}, "
            f"{NOISE_MULTIPLE:g}x the model's own float noise), so prefix sharing would train on wrong numbers"
        )

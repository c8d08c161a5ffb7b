"""The shared-prefix forward of sequence-classification (reward) models.

A transformers sequence-classification head runs the backbone on padded rows, projects every position through its
``score`` layer and keeps, per row, the score at the last token that is not the pad id. When the batch carries a
packed layout (``prefix_share=...``), the wrapped forward runs the backbone once on the packed rows instead, gathers
the hidden states at the packed positions the collator mapped those read-out tokens to (``score_index``, one per
stock row) and projects only them, so TRL's ``RewardTrainer.compute_loss`` receives ``logits`` of the stock shape.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from trl.trainer.reward_trainer import DataCollatorForPreference

from trl_prefix_share.core.attention import layout_for_batch, packed_forward_scope
from trl_prefix_share.core.layout import move_to_device
from trl_prefix_share.core.mixers.kinds import compute_precision
from trl_prefix_share.core.mixers.segmented import check_mixers_ran, restore_segmented_mixers
from trl_prefix_share.core.model_support import (
    UnsupportedModelError,
    clipped_windows,
    probe_tolerance,
    switch_attention,
)
from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.core.reward.collator import SCORE_INDEX_KEY, PrefixSharedRewardCollator
from trl_prefix_share.core.tree_support import probe_packing

_MARK = "_prefix_share_scores"
# Batch keys that describe the stock padded rows (or TRL's loss inputs): the packed forward replaces them.
_STOCK_INPUTS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "inputs_embeds",
    "use_cache",
    "past_key_values",
    "margin",
)


def score_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The backbone and the ``score`` layer of a transformers sequence-classification model, or an explanation."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    score = getattr(model, "score", None)
    if backbone is None or score is None or backbone is model:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers sequence-classification model with a backbone and a "
            "`score` head (like `LlamaForSequenceClassification`); prefix sharing cannot read its rewards. Use the "
            "stock `RewardTrainer`."
        )
    return backbone, score


def packed_scores(model: torch.nn.Module, packed: dict[str, Any], kernel: str, **kwargs: Any) -> torch.Tensor:
    """Scores ``[num_stock_rows, num_labels]`` of the packed batch, in stock row order."""
    backbone, score = score_head(model)
    layout = layout_for_batch(packed, kernel)
    mixers = restore_segmented_mixers(model)  # a re-kernelizing train() / eval() may have dropped them
    with packed_forward_scope():
        outputs = backbone(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            use_cache=False,
            prefix_share_layout=layout,
            **kwargs,
        )
    if layout.layer_calls == 0 and layout.mixer_calls == 0:
        raise RuntimeError(
            f"{type(model).__name__} did not pass the packed layout to its attention layers, so the packed forward "
            "would be plain causal attention. This architecture cannot be served by prefix sharing."
        )
    check_mixers_ran(model, layout, mixers)
    hidden = outputs.last_hidden_state
    picked = hidden.reshape(-1, hidden.size(-1)).index_select(0, packed[SCORE_INDEX_KEY])
    return score(picked)


def install_packed_scores(model: torch.nn.Module, kernel: str) -> None:
    """Wrap ``model.forward`` once: with ``prefix_share=<packed batch>`` it returns the packed scores."""
    inner = model.forward
    if getattr(inner, _MARK, False):
        return

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any):
        packed = kwargs.pop(PACKED_KEY, None)
        if packed is None:
            return inner(*args, **kwargs)
        if args:
            raise TypeError("The prefix-shared forward takes keyword arguments only.")
        if kwargs.pop("labels", None) is not None:
            raise ValueError("The prefix-shared reward forward computes scores only; compute the loss from `logits`.")
        for name in (*_STOCK_INPUTS, "return_dict"):
            kwargs.pop(name, None)
        return SequenceClassifierOutputWithPast(logits=packed_scores(model, packed, kernel, **kwargs))

    setattr(forward, _MARK, True)
    model.forward = forward


def enable_packed_scores(model: torch.nn.Module, kernel: str) -> None:
    """Switch a sequence-classification model (not a PEFT wrapper: its base model) to the packed forward."""
    score_head(model)
    switch_attention(model)
    install_packed_scores(model, kernel)


def _probe_examples(vocab_size: int, pad_token_id: int | None) -> list[dict[str, list[int]]]:
    """Three pairs with common prefixes and uneven lengths (past the probe's clipped windows), from low token ids
    other than the pad id."""
    high = max(4, min(vocab_size, 200))
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        ids = torch.randint(1, high, (n,), generator=generator)
        return torch.where(ids == pad_token_id, ids % (high - 1) + 1, ids).tolist()

    head = tokens(3)  # common to the first two prompts: a two-level prefix tree where the model takes trees
    first, second, third = head + tokens(8), head + tokens(1), tokens(6)
    return [
        {"chosen_ids": first + tokens(7), "rejected_ids": first + tokens(4)},
        {"chosen_ids": second + tokens(10), "rejected_ids": second + tokens(2)},
        {"chosen_ids": third + tokens(5), "rejected_ids": third + tokens(9)},
    ]


@torch.no_grad()
def verify_packed_scores(model: torch.nn.Module, kernel: str, device: torch.device) -> None:
    """Score a probe batch packed and unpacked; raise if they disagree beyond the model's own float noise.

    Catches architectures whose attention or positions do not follow the layout, or whose head reads the score
    somewhere else than the last non-pad token. Sliding windows are clipped below the probe's lengths.
    """
    pad_token_id = model.config.get_text_config().pad_token_id
    pad = 0 if pad_token_id is None else pad_token_id
    vocab_size = model.get_input_embeddings().weight.shape[0]
    collator = PrefixSharedRewardCollator(
        DataCollatorForPreference(pad_token_id=pad),
        pad_token_id=pad,
        options=probe_packing(model, kernel),
    )
    batch = move_to_device(collator(_probe_examples(vocab_size, pad_token_id)), device)
    was_training = model.training
    model.eval()
    try:
        with clipped_windows(model):
            stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            alone = torch.cat(
                [
                    model(input_ids=batch["input_ids"][row : row + 1, :length], use_cache=False).logits
                    for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist())
                ]
            )
            ours = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
                **{PACKED_KEY: batch[PACKED_KEY]},
            ).logits
    finally:
        model.train(was_training)
    stock = stock.logits.float()
    everywhere = torch.ones_like(stock, dtype=torch.bool)
    tolerance = probe_tolerance(stock, alone.float(), everywhere, compute_precision(model))
    difference = float((ours.float() - stock).abs().max())
    if not difference <= tolerance:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the packed reward forward differs from the unpacked one by {difference:.3g} "
            f"on the construction probe (allowed {tolerance:.3g}, a multiple of the model's own float noise), so "
            "prefix sharing would train on wrong numbers"
        )

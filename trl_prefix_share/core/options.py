"""Prefix-sharing knobs, as a dataclass mixed into our trainer configs.

A plain TRL config works too: every knob missing from it takes the default below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from trl_prefix_share.core.attention import resolve_kernel
from trl_prefix_share.core.layout.tree import MIN_SHARED_TOKENS
from trl_prefix_share.core.packing import PackingOptions


@dataclass
class PrefixShareArguments:
    """Options of the shared-prefix packed forward.

    Parameters:
        share_prefix (`bool`, defaults to `True`):
            Run each prompt once for all its responses. `False` packs every sequence as its own document (padding-free
            but unshared: the honest "packed stock" baseline for ablations).
        pack_documents (`bool`, defaults to `True`):
            Pack several documents into one row. `False` gives every document its own row, rows padded to the longest:
            the "sharing without packing" ablation, slower than the default.
        max_row_tokens (`int` or `None`, defaults to `None`):
            Token budget of one packed row; documents fill rows greedily. `None` packs the whole batch into one row.
        pad_rows_to_multiple_of (`int` or `None`, defaults to `None`):
            Pad packed rows to a multiple of this length. `None`: 128 on CUDA (bounds recompiles of the compiled
            kernel), no padding elsewhere.
        prefix_share_attention (`str`, defaults to `"auto"`):
            Attention kernel: `"auto"` (FlexAttention on CUDA, per-group SDPA elsewhere), `"sdpa"`, `"flex"`, or
            `"flex_eager"` (uncompiled FlexAttention, forward only on CPU; for tests).
        verify_model (`bool`, defaults to `True`):
            At construction, check on a few tokens that the packed forward of this model equals its unpacked forward,
            (see `on_unsupported_model` for a model that does not pass). Skipped under DeepSpeed / FSDP, where the
            structural check alone guards.
        on_unsupported_model (`str`, defaults to `"fallback"`):
            What to do with a model the packed path cannot serve exactly (found from its layers, e.g. convolution or
            SSM mixers, sinks or soft-capping not passed to the attention function, or by the probe): `"fallback"`
            trains exactly like the stock TRL trainer, with one warning naming the reason; `"error"` raises
            `UnsupportedModelError`.
        group_by_prompt (`bool`, defaults to `False`):
            DPO: batch the pairs that share a prompt together and lay each prompt out once for all its pairs (one
            branch per distinct response). Opt-in: it changes which examples share a batch (see
            `docs/reward_and_many_responses.md`).
        length_grouped_batches (`bool`, defaults to `False`):
            DPO: batch pairs of similar length together (seeded buckets, batch order shuffled; same pairs per batch,
            so the loss is normalised as usual). Evens out tokens per step across processes; opt-in because it
            changes which examples share a batch (see `docs/choosing_options.md`).
        length_bucket_batches (`int`, defaults to `64`):
            Batches per sorting bucket of `length_grouped_batches` and `max_batch_tokens`: larger groups lengths more
            tightly.
        max_batch_tokens (`int` or `None`, defaults to `None`):
            DPO: token-budget batches. As many pairs per batch as fit this many packed tokens (prompt once + both
            responses), from shuffled length-sorted buckets; `per_device_train_batch_size` is then not used. Each
            pair weighs the same in the loss across micro-batches and processes (see `token_budget.py`).
        prefix_tree (`bool`, defaults to `True`):
            Merge the prompts of a batch into a prefix tree: prompts that start alike (a system prompt, tool schemas,
            earlier turns) share those tokens too, not only identical prompts. Changes no batching. Off by itself
            for models that cannot take it (vision-language models; mixers on the padded run), see
            `docs/prefix_trees.md`.
        prefix_tree_min_shared_tokens (`int`, defaults to `32`):
            The fewest tokens different prompts must have in common to share them in the tree (prompts that are the
            same always share). Each shared node is one more depth for a hybrid's state-carrying mixers and more
            attention groups, which a few common template tokens do not pay for.
        drop_invalid_examples (`bool`, defaults to `False`):
            Drop examples prefix sharing cannot train on (an empty response, a document longer than
            `max_row_tokens`) with a warning, instead of raising an error that names them.
    """

    share_prefix: bool = field(default=True, metadata={"help": "Run each prompt once for all its responses."})
    pack_documents: bool = field(
        default=True, metadata={"help": "Pack several documents per row (False: one per row, an ablation)."}
    )
    max_row_tokens: int | None = field(default=None, metadata={"help": "Token budget of one packed row."})
    pad_rows_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad packed rows to a multiple of this (default: 128 on CUDA, none on CPU)."}
    )
    prefix_share_attention: str = field(
        default="auto", metadata={"help": "Attention kernel: auto, sdpa, flex or flex_eager."}
    )
    verify_model: bool = field(
        default=True, metadata={"help": "Check at construction that the packed forward equals the unpacked one."}
    )
    on_unsupported_model: str = field(
        default="fallback",
        metadata={"help": "Model the packed path cannot serve: fallback (train like stock) or error."},
    )
    group_by_prompt: bool = field(
        default=False, metadata={"help": "DPO: batch pairs with the same prompt together, the prompt run once."}
    )
    length_grouped_batches: bool = field(
        default=False, metadata={"help": "DPO: batch pairs of similar length together (shuffled buckets)."}
    )
    length_bucket_batches: int = field(
        default=64, metadata={"help": "Batches per sorting bucket of length_grouped_batches."}
    )
    max_batch_tokens: int | None = field(
        default=None, metadata={"help": "DPO: token-budget batches of at most this many packed tokens."}
    )
    drop_invalid_examples: bool = field(
        default=False, metadata={"help": "Drop examples prefix sharing cannot train on instead of raising."}
    )
    prefix_tree: bool = field(
        default=True, metadata={"help": "Share what different prompts have in common (a prefix tree per batch)."}
    )
    prefix_tree_min_shared_tokens: int = field(
        default=MIN_SHARED_TOKENS,
        metadata={"help": "Fewest tokens different prompts must have in common to share them in the prefix tree."},
    )


PREFIX_SHARE_FIELDS = tuple(f.name for f in fields(PrefixShareArguments))
UNSUPPORTED_MODEL_CHOICES = ("fallback", "error")


def prefix_share_arguments(args: Any) -> PrefixShareArguments:
    """The prefix-sharing options of any config: its own values where it has them, defaults elsewhere."""
    options = PrefixShareArguments(**{name: getattr(args, name) for name in PREFIX_SHARE_FIELDS if hasattr(args, name)})
    if options.prefix_tree_min_shared_tokens < 1:
        raise ValueError(
            f"prefix_tree_min_shared_tokens={options.prefix_tree_min_shared_tokens}: give 1 or more (1 shares every "
            "common token; prefix_tree=False turns trees off)."
        )
    if options.on_unsupported_model not in UNSUPPORTED_MODEL_CHOICES:
        raise ValueError(
            f"on_unsupported_model={options.on_unsupported_model!r}; choose one of {UNSUPPORTED_MODEL_CHOICES}."
        )
    return options


def packing_options(options: PrefixShareArguments, device: torch.device) -> PackingOptions:
    """The packing choice of a trainer on ``device``: the attention kernel ``auto`` resolves to (and, with it, whether
    the collator builds the SDPA decomposition's index tensors) and the row padding multiple."""
    kernel = resolve_kernel(options.prefix_share_attention, device)
    multiple = options.pad_rows_to_multiple_of
    if multiple is None and device.type == "cuda":
        multiple = 128
    return PackingOptions(
        share_prefix=options.share_prefix,
        max_row_tokens=options.max_row_tokens,
        pad_to_multiple_of=multiple,
        pack_documents=options.pack_documents,
        kernel=kernel,
        prefix_tree_min_shared_tokens=options.prefix_tree_min_shared_tokens,
    )

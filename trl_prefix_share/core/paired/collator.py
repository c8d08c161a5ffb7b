"""The paired collator (ORPO / CPO): the packed layout of the trainers' stacked ``[chosen; rejected]`` batch.

``trl.experimental.orpo.ORPOTrainer`` and ``trl.experimental.cpo.CPOTrainer`` tokenize and truncate each example up
front (``tokenize_row``), pad a batch with their own collator, and stack it as ``[chosen rows; rejected rows]`` in
``concatenated_inputs``. That stacked batch is the *virtual* layout here: its rows become the sequences of the packed
layout, so truncation and padding stay TRL's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from trl_prefix_share.core.layout import IGNORE_INDEX, SequenceSpec, pack_documents
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions
from trl_prefix_share.core.preference.collator import pair_documents, sequences_from_padded_batch


def sequences_from_concatenated(concatenated: dict[str, torch.Tensor], score_chosen_prompt: bool) -> list[SequenceSpec]:
    """One sequence per row of TRL's ``[chosen; rejected]`` batch; completion = positions whose label is not -100.

    With ``score_chosen_prompt`` (ORPO's NLL term covers prompt + chosen), the chosen sequences are scored from their
    second token on, so a shared prompt is scored once, for the chosen sequence only.
    """
    labels = concatenated["concatenated_labels"]
    sequences = sequences_from_padded_batch(
        concatenated["concatenated_input_ids"], concatenated["concatenated_attention_mask"], labels != IGNORE_INDEX
    )
    if score_chosen_prompt:
        half = len(sequences) // 2
        sequences[:half] = [
            dataclasses.replace(seq, label_start=min(1, seq.completion_start)) for seq in sequences[:half]
        ]
    return sequences


def check_completions(labels: torch.Tensor) -> None:
    """Refuse a batch where a sequence has no completion token (stock TRL divides by zero there: a NaN loss)."""
    empty = (labels[:, 1:] == IGNORE_INDEX).all(dim=1)
    if bool(empty.any()):
        half = labels.size(0) // 2
        rows = empty.nonzero().squeeze(1).tolist()
        named = ", ".join(f"{'chosen' if r < half else 'rejected'} of pair {r % half}" for r in rows)
        raise ValueError(
            f"The batch has responses with no token left after truncation ({named}); their log-probability average "
            "is undefined (stock TRL returns a NaN loss). Raise `max_length`, shorten the prompts, or filter such "
            "examples out (the trainer does so up front for map-style datasets with `drop_invalid_examples=True`)."
        )


def pack_concatenated(
    concatenated: dict[str, torch.Tensor], pad_token_id: int, options: PackingOptions, score_chosen_prompt: bool
) -> dict[str, Any]:
    """The packed layout of TRL's stacked batch (CPU tensors in, CPU tensors out)."""
    input_ids = concatenated["concatenated_input_ids"]
    if input_ids.size(0) % 2:
        raise ValueError(f"Expected a [chosen; rejected] batch with an even number of rows, got {input_ids.size(0)}.")
    check_completions(concatenated["concatenated_labels"])
    sequences = sequences_from_concatenated(concatenated, score_chosen_prompt)
    return pack_documents(
        pair_documents(sequences, options.share_prefix),
        num_virtual_rows=input_ids.size(0),
        virtual_length=input_ids.size(1),
        pad_token_id=pad_token_id,
        **options.layout_kwargs(),
    )


class PairedPackingCollator:
    """Wraps the trainer's collator and adds the packed layout of its batch under ``batch["prefix_share"]``.

    Built in the data loader (CPU, possibly in worker processes), so the training step does not wait for it.

    Args:
        base_collator: TRL's ``DPODataCollatorWithPadding`` or any collator with the same keys.
        concatenate: the trainer's own ``concatenated_inputs`` with its arguments bound (stacks the padded batch).
        pad_token_id: id written into the padding of packed rows.
        options: packing options.
        score_chosen_prompt: score the chosen sequences' prompt tokens too (ORPO).
    """

    def __init__(
        self,
        base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        concatenate: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
        pad_token_id: int,
        options: PackingOptions,
        score_chosen_prompt: bool,
    ) -> None:
        self.base_collator = base_collator
        self.concatenate = concatenate
        self.pad_token_id = pad_token_id
        self.options = options
        self.score_chosen_prompt = score_chosen_prompt

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base_collator(features)
        missing = {
            f"{side}_{key}" for side in ("chosen", "rejected") for key in ("input_ids", "attention_mask", "labels")
        }
        missing -= set(batch)
        if missing:
            raise ValueError(
                f"The data collator's batch lacks {sorted(missing)}; prefix sharing needs the ORPO/CPO batch layout "
                "(`chosen_*` and `rejected_*` input ids, attention masks and labels, right-padded)."
            )
        batch[PACKED_KEY] = pack_concatenated(
            self.concatenate(batch), self.pad_token_id, self.options, self.score_chosen_prompt
        )
        return batch

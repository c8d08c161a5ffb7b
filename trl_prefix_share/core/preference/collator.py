"""The preference collator (DPO): TRL's own padded preference batch plus the packed layout of the same sequences.

The stock collator stays in charge of truncation and padding, so the sequences we pack are by construction the ones
stock TRL scores. Its padded batch (the *virtual* layout) travels along: TRL's loss code reads its
``completion_mask`` and ``attention_mask``, and our forward scatters per-token results into its shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from trl_prefix_share.core.layout import DocumentSpec, SequenceSpec, make_document, pack_documents
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions


def sequences_from_padded_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> list[SequenceSpec]:
    """Unpad the rows of a right-padded stock batch into sequences (one per row)."""
    lengths = attention_mask.sum(dim=1)
    if bool((attention_mask[:, 0] == 0).any()) and bool((lengths > 0).all()):
        raise ValueError(
            "The preference batch is left-padded; prefix sharing needs TRL's right-padded layout. Use TRL's "
            "`DataCollatorForPreference` (the default) or pad on the right in your custom collator."
        )
    has_completion = completion_mask.bool().any(dim=1)
    completion_start = torch.where(has_completion, completion_mask.int().argmax(dim=1), lengths)
    sequences = []
    for row, (length, start) in enumerate(zip(lengths.tolist(), completion_start.tolist(), strict=True)):
        sequences.append(SequenceSpec(tokens=input_ids[row, :length], completion_start=start, virtual_row=row))
    return sequences


def pair_documents(sequences: list[SequenceSpec], share_prefix: bool) -> list[DocumentSpec]:
    """Stock batches are ``[chosen rows; rejected rows]``: pair row b with row B + b in one document."""
    half = len(sequences) // 2
    return [make_document([sequences[b], sequences[half + b]], share_prefix) for b in range(half)]


class PrefixSharedPreferenceCollator:
    """Wraps a stock preference collator and adds the packed layout under ``batch["prefix_share"]``.

    Args:
        base_collator: TRL's ``DataCollatorForPreference`` (or any collator with the same output keys).
        pad_token_id: id used to pad packed rows.
        options: packing options.
        group_documents: builds documents from the stock batch's sequences; the default pairs chosen and rejected.
    """

    def __init__(
        self,
        base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        pad_token_id: int,
        options: PackingOptions,
        group_documents: Callable[[list[SequenceSpec], bool], list[DocumentSpec]] = pair_documents,
    ) -> None:
        self.base_collator = base_collator
        self.pad_token_id = pad_token_id
        self.options = options
        self.group_documents = group_documents

    #: Whether the layout records each packed token's stock token (``source_index``: image features, positions).
    needs_source_index = False
    #: Whether documents may merge into prefix trees (when the options allow it).
    merges_documents = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base_collator(examples)
        batch[PACKED_KEY] = self.pack(batch)
        return batch

    def pack(self, batch: dict[str, Any], prompt_images: list[str] | None = None) -> dict[str, Any]:
        """The packed layout of a stock batch; ``prompt_images``: a fingerprint of each example's images."""
        missing = {"input_ids", "attention_mask", "completion_mask"} - set(batch)
        if missing:
            raise ValueError(
                f"The data collator's batch lacks {sorted(missing)}; prefix sharing needs TRL's preference batch "
                "layout (`input_ids`, `attention_mask`, `completion_mask`, chosen rows then rejected rows)."
            )
        input_ids = batch["input_ids"]
        sequences = sequences_from_padded_batch(input_ids, batch["attention_mask"], batch["completion_mask"])
        if prompt_images is not None:
            half = len(sequences) // 2
            sequences = [
                dataclasses.replace(seq, prompt_images=prompt_images[row % half]) for row, seq in enumerate(sequences)
            ]
        documents = self.group_documents(sequences, self.options.share_prefix)
        layout = self.options.layout_kwargs()
        layout["prefix_tree"] = layout["prefix_tree"] and self.merges_documents
        return pack_documents(
            documents,
            num_virtual_rows=input_ids.size(0),
            virtual_length=input_ids.size(1),
            pad_token_id=self.pad_token_id,
            source_index=self.needs_source_index,
            **layout,
        )

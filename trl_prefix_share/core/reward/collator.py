"""Collator for reward models: TRL's padded reward batch plus the packed layout and each row's read-out position.

TRL's reward batch is ``[chosen rows; rejected rows]`` of full sequences, right-padded, with no completion mask. Any
common token prefix of the sequences of a document can be shared (attention is causal: a shared position sees the
same context in every sequence). A transformers sequence-classification head reads a row's score at its last token
that is not the pad id, so a sequence whose own tokens end in pad ids is read earlier. Tokens after that read-out
token cannot change its hidden state (causal attention), so each sequence is laid out only up to it: the score is
read at the last token of its branch (``last_index`` of the layout), exactly where stock reads it in the padded row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trl_prefix_share.core.layout import DocumentSpec, SequenceSpec, make_document, pack_documents
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions
from trl_prefix_share.core.preference.collator import pair_documents

# Packed-batch key: flat packed index of each stock row's read-out token, where the packed forward reads its score.
SCORE_INDEX_KEY = "score_index"
# Optional batch key (one id per stock row): rows with the same id form one document (ranked lists).
ROW_GROUPS_KEY = "prefix_share_row_groups"


def read_out_positions(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Per padded row, where transformers' sequence-classification heads read the score: the rightmost token that is
    not ``pad_token_id`` (0 when there is none). Without a pad id the head reads the last position of the row."""
    if pad_token_id is None:
        return torch.full((input_ids.size(0),), input_ids.size(1) - 1, dtype=torch.long)
    not_pad = (input_ids != pad_token_id).long()
    return (torch.arange(input_ids.size(1)) * not_pad).argmax(dim=1)


def reward_sequences(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, read_out: torch.Tensor
) -> list[SequenceSpec]:
    """Unpad a right-padded reward batch into sequences, each cut after its read-out token.

    Nothing is scored token by token, and any common prefix may be shared: ``completion_start`` = ``label_start`` =
    the cut length, which keeps the read-out token (the last one) inside the sequence's own branch.
    """
    lengths = attention_mask.sum(dim=1)
    if bool((attention_mask[:, 0] == 0).any()) and bool((lengths > 0).all()):
        raise ValueError(
            "The reward batch is left-padded; prefix sharing needs TRL's right-padded layout. Use TRL's "
            "`DataCollatorForPreference` (the default) or pad on the right in your custom collator."
        )
    sequences = []
    for row, (length, position) in enumerate(zip(lengths.tolist(), read_out.tolist(), strict=True)):
        if length == 0:
            raise ValueError(f"Row {row} of the reward batch is empty: there is no token to read a reward from.")
        if position >= length:
            raise ValueError(
                f"Row {row} of the reward batch would be scored at padding position {position} (its sequence has "
                f"{length} tokens): the batch is padded with a token other than the model's pad id. Pad with "
                "`processing_class.pad_token_id`."
            )
        end = position + 1
        sequences.append(SequenceSpec(input_ids[row, :end], completion_start=end, virtual_row=row, label_start=end))
    return sequences


def documents_by_row_groups(
    sequences: list[SequenceSpec], groups: torch.Tensor, share_prefix: bool
) -> list[DocumentSpec]:
    """One document per group id, its sequences in row order (identical ones scored from one branch)."""
    members: dict[int, list[SequenceSpec]] = {}
    for seq, group in zip(sequences, groups.tolist(), strict=True):
        members.setdefault(group, []).append(seq)
    return [make_document(group, share_prefix) for group in members.values()]


class PrefixSharedRewardCollator:
    """Wraps a stock reward collator and adds the packed layout (with ``score_index``) under ``batch["prefix_share"]``.

    The stock ``input_ids`` and ``attention_mask`` stay in the batch (TRL counts ``num_tokens`` from them); the packed
    forward ignores them.

    Args:
        base_collator: TRL's reward ``DataCollatorForPreference`` (or any collator with the same output keys).
        pad_token_id: the model's pad id: it decides where scores are read, and pads the packed rows.
        options: packing options.
        group_documents: builds documents from the batch's sequences when the batch has no ``ROW_GROUPS_KEY``; the
            default pairs row ``b`` (chosen) with row ``B + b`` (rejected).
        ranked_collator: collator for examples in the ranked-list format (``response_ids``), see ``ranked.py``.
    """

    def __init__(
        self,
        base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        pad_token_id: int | None,
        options: PackingOptions,
        group_documents: Callable[[list[SequenceSpec], bool], list[DocumentSpec]] = pair_documents,
        ranked_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    ) -> None:
        self.base_collator = base_collator
        self.pad_token_id = pad_token_id
        self.options = options
        self.group_documents = group_documents
        self.ranked_collator = ranked_collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.ranked_collator is not None and examples and "response_ids" in examples[0]:
            batch = self.ranked_collator(examples)
        else:
            batch = self.base_collator(examples)
        missing = {"input_ids", "attention_mask"} - set(batch)
        if missing:
            raise ValueError(
                f"The data collator's batch lacks {sorted(missing)}; prefix sharing needs TRL's reward batch layout "
                "(`input_ids`, `attention_mask`, chosen rows then rejected rows)."
            )
        input_ids = batch["input_ids"]
        read_out = read_out_positions(input_ids, self.pad_token_id)
        sequences = reward_sequences(input_ids, batch["attention_mask"], read_out)
        groups = batch.pop(ROW_GROUPS_KEY, None)
        if groups is not None:
            documents = documents_by_row_groups(sequences, groups, self.options.share_prefix)
        else:
            documents = self.group_documents(sequences, self.options.share_prefix)
        packed = pack_documents(
            documents,
            num_virtual_rows=input_ids.size(0),
            virtual_length=input_ids.size(1),
            pad_token_id=0 if self.pad_token_id is None else self.pad_token_id,
            **self.options.layout_kwargs(),
        )
        packed[SCORE_INDEX_KEY] = packed["last_index"]
        batch[PACKED_KEY] = packed
        return batch

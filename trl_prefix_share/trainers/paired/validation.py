"""Up-front check of ORPO / CPO datasets: examples prefix sharing cannot train on are named (or dropped)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from datasets import Dataset

from trl_prefix_share.core.invalid_examples import refuse_or_drop_pairs
from trl_prefix_share.core.layout import IGNORE_INDEX, SequenceSpec, make_document
from trl_prefix_share.core.options import PrefixShareArguments

logger = logging.getLogger(__name__)


def _completion_start(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def document_tokens(example: dict[str, list[int]], share_prefix: bool, score_chosen_prompt: bool) -> int:
    """Tokens the packed document of one tokenized example occupies (exact: same rules as the layout)."""
    specs = []
    for row, side in enumerate(("chosen", "rejected")):
        tokens = torch.tensor(example[f"{side}_input_ids"], dtype=torch.long)
        start = _completion_start(example[f"{side}_labels"])
        label_start = min(1, start) if score_chosen_prompt and side == "chosen" else None
        specs.append(SequenceSpec(tokens=tokens, completion_start=start, virtual_row=row, label_start=label_start))
    return make_document(specs, share_prefix).num_tokens


def validate_paired_dataset(
    dataset: Any,
    dataset_name: str,
    options: PrefixShareArguments,
    score_chosen_prompt: bool,
) -> Any:
    """Raise on (or drop, with ``drop_invalid_examples``) tokenized examples prefix sharing cannot train on.

    Checked on TRL's ``tokenize_row`` output (map-style datasets; others are checked batch by batch at packing):
    an empty chosen or rejected response after truncation (TRL truncates the response, never the prompt, so a long
    prompt leaves nothing; stock TRL then returns a NaN loss), and a document longer than ``max_row_tokens``.
    """
    if not isinstance(dataset, Dataset):
        return dataset
    keys = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    empty: list[int] = []
    too_long: list[tuple[int, int]] = []
    index = 0
    for batch in dataset.select_columns(keys).iter(batch_size=1000):
        for values in zip(*(batch[key] for key in keys), strict=True):
            example = dict(zip(keys, values, strict=True))
            if all(label == IGNORE_INDEX for label in example["chosen_labels"][1:]) or all(
                label == IGNORE_INDEX for label in example["rejected_labels"][1:]
            ):
                empty.append(index)
            elif options.max_row_tokens is not None:
                length = document_tokens(example, options.share_prefix, score_chosen_prompt)
                if length > options.max_row_tokens:
                    too_long.append((index, length))
            index += 1
    reason = (
        "after truncation (the prompt alone fills `max_length`; stock TRL would return a NaN loss). Raise "
        "`max_length` or filter out long prompts"
    )
    return refuse_or_drop_pairs(
        dataset,
        dataset_name,
        empty,
        reason,
        too_long,
        options.max_row_tokens,
        options.drop_invalid_examples,
        logger,
    )

"""Up-front checks of a tokenized preference dataset, so bad examples are named before training starts.

Checked (map-style datasets; streaming ones are checked batch by batch in the collator):
- an empty chosen or rejected response: nothing to score on that side;
- a document longer than `max_row_tokens`: it cannot fit any packed row.
Each is an error naming the examples and the fix, or, with `drop_invalid_examples=True`, a warning and a drop.
Identical chosen and rejected responses are exact (their loss carries no signal) and only counted in a warning.
"""

from __future__ import annotations

import logging

from datasets import Dataset

from trl_prefix_share.core.invalid_examples import refuse_or_drop_pairs

logger = logging.getLogger(__name__)


def truncated_length(prompt_len: int, response_len: int, max_length: int | None) -> int:
    """Length of prompt+response after TRL's per-sequence truncation (either mode keeps `max_length` tokens)."""
    total = prompt_len + response_len
    return total if max_length is None else min(total, max_length)


def document_length_upper_bound(prompt_len: int, chosen_len: int, rejected_len: int, max_length: int | None) -> int:
    """Packed length of a pair, assuming the truncated prompt is shared (exact for `keep_start`)."""
    chosen = truncated_length(prompt_len, chosen_len, max_length)
    rejected = truncated_length(prompt_len, rejected_len, max_length)
    shared = min(prompt_len, chosen, rejected)
    return chosen + rejected - max(shared - 1, 0) if shared >= 2 else chosen + rejected


def validate_preference_dataset(
    dataset: Dataset,
    dataset_name: str,
    max_length: int | None,
    truncation_mode: str,
    max_row_tokens: int | None,
    drop_invalid: bool,
) -> Dataset:
    """Raise on (or drop, when `drop_invalid`) examples prefix sharing cannot train on; return the kept dataset."""
    if not isinstance(dataset, Dataset):
        return dataset
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    empty: list[int] = []
    too_long: list[tuple[int, int]] = []
    identical = 0
    index = 0
    for batch in columns.iter(batch_size=1000):
        for prompt, chosen, rejected in zip(
            batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], strict=True
        ):
            if not chosen or not rejected:
                empty.append(index)
            elif max_row_tokens is not None:
                length = document_length_upper_bound(len(prompt), len(chosen), len(rejected), max_length)
                if truncation_mode == "keep_end":  # truncated prompts may differ: assume nothing is shared
                    length = truncated_length(len(prompt), len(chosen), max_length) + truncated_length(
                        len(prompt), len(rejected), max_length
                    )
                if length > max_row_tokens:
                    too_long.append((index, length))
            if chosen == rejected:
                identical += 1
            index += 1

    if identical:
        logger.warning(
            "%d example(s) of the %s dataset have identical chosen and rejected responses; they are trained exactly "
            "as stock TRL does, but carry no preference signal.",
            identical,
            dataset_name,
        )
    reason = (
        "after tokenization, so that side has no token to score. Remove them (e.g. `dataset.filter(lambda x: "
        "x['chosen'] and x['rejected'])`)"
    )
    return refuse_or_drop_pairs(dataset, dataset_name, empty, reason, too_long, max_row_tokens, drop_invalid, logger)


def check_not_emptied(before: int | None, dataset: Dataset, dataset_name: str, max_length: int | None) -> None:
    """Name the cause when TRL's preparation dropped every example (else the sampler fails with `num_samples=0`)."""
    if before and isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(
            f"All {before} examples of the {dataset_name} dataset were dropped while preparing it: with "
            f"`max_length={max_length}` and `truncation_mode='keep_start'`, every prompt alone fills `max_length`, so "
            "no response token is left to train on. Raise `max_length` or shorten the prompts."
        )

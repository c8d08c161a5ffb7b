"""Naming the examples a trainer cannot lay out, then raising or dropping them: the ending every dataset check
(DPO, ORPO/CPO, reward) shares."""

from __future__ import annotations

import logging

from datasets import Dataset

#: How many example indices a message names before "and N more".
SHOWN = 10


def describe_indices(indices: list[int]) -> str:
    """`"3, 7, 12"`, or the first `SHOWN` and how many more."""
    shown = ", ".join(str(i) for i in indices[:SHOWN])
    return shown + (f" and {len(indices) - SHOWN} more" if len(indices) > SHOWN else "")


def refuse_or_drop_pairs(
    dataset: Dataset,
    dataset_name: str,
    empty: list[int],
    empty_reason: str,
    too_long: list[tuple[int, int]],
    max_row_tokens: int | None,
    drop_invalid: bool,
    logger: logging.Logger,
) -> Dataset:
    """Raise one error naming the empty-response and too-long examples and the fix, or drop them with a warning.

    ``empty_reason`` completes "have an empty chosen or rejected response ..." for the trainer at hand."""
    problems = []
    # The fixes name `drop_invalid_examples=True` only where it is not set already (then the examples are dropped).
    or_drop = "" if drop_invalid else ", or set `drop_invalid_examples=True`"
    if empty:
        problems.append(
            f"example(s) {describe_indices(empty)} of the {dataset_name} dataset have an empty chosen or rejected "
            f"response {empty_reason}{or_drop}"
        )
    if too_long:
        longest = max(length for _, length in too_long)
        problems.append(
            f"example(s) {describe_indices([i for i, _ in too_long])} of the {dataset_name} dataset need up to "
            f"{longest} tokens as one packed document, more than `max_row_tokens={max_row_tokens}`. Raise "
            f"`max_row_tokens` to at least {longest} or lower `max_length`{or_drop}"
        )
    if not problems:
        return dataset
    if not drop_invalid:
        raise ValueError("Prefix sharing cannot train on some examples: " + "; and ".join(problems) + ".")
    bad = set(empty) | {i for i, _ in too_long}
    logger.warning("Dropping %d example(s) of the %s dataset: %s.", len(bad), dataset_name, "; ".join(problems))
    return dataset.select([i for i in range(len(dataset)) if i not in bad])

"""Up-front checks of a tokenized reward dataset (pairs or ranked lists), so bad examples are named before training.

Checked (map-style datasets): an empty sequence (no token to read a reward from; stock would read a padding
position) and a document longer than ``max_row_tokens`` (it cannot fit any packed row). Each is an error naming the
examples, or, with ``drop_invalid_examples=True``, a warning and a drop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from datasets import Dataset

from trl_prefix_share.core.invalid_examples import describe_indices

logger = logging.getLogger(__name__)


def _read_out_length(ids: Sequence[int], pad_token_id: int | None) -> int:
    """Tokens up to and including the read-out token (the last one that is not the pad id)."""
    for index in range(len(ids) - 1, 0, -1):
        if ids[index] != pad_token_id:
            return index + 1
    return min(len(ids), 1)


def document_tokens(sequences: Sequence[Sequence[int]], pad_token_id: int | None) -> int:
    """Tokens of the packed document of these sequences (shared common prefix, one branch per distinct sequence)."""
    cut = list(dict.fromkeys(tuple(ids[: _read_out_length(ids, pad_token_id)]) for ids in sequences))
    if len(cut) < 2:
        return sum(map(len, cut))
    limit = min(map(len, cut))
    shared = 0
    while shared < limit and all(ids[shared] == cut[0][shared] for ids in cut):
        shared += 1
    head = shared - 1 if shared >= 2 else 0
    return head + sum(len(ids) - head for ids in cut)


def validate_reward_dataset(
    dataset: Dataset,
    dataset_name: str,
    pad_token_id: int | None,
    max_row_tokens: int | None,
    drop_invalid: bool,
) -> Dataset:
    """Raise on (or drop, when ``drop_invalid``) examples prefix sharing cannot train on; return the kept dataset."""
    if not isinstance(dataset, Dataset):
        return dataset
    ranked = "response_ids" in dataset.column_names
    columns = ["response_ids"] if ranked else ["chosen_ids", "rejected_ids"]
    empty: list[int] = []
    too_long: list[tuple[int, int]] = []
    index = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1000):
        groups = batch["response_ids"] if ranked else zip(batch["chosen_ids"], batch["rejected_ids"], strict=True)
        for sequences in groups:
            if any(len(ids) == 0 for ids in sequences):
                empty.append(index)
            elif max_row_tokens is not None:
                length = document_tokens(sequences, pad_token_id)
                if length > max_row_tokens:
                    too_long.append((index, length))
            index += 1
    problems = []
    if empty:
        problems.append(f"{len(empty)} example(s) with an empty sequence (indices {describe_indices(empty)})")
    if too_long:
        worst = max(length for _, length in too_long)
        problems.append(
            f"{len(too_long)} example(s) whose document is longer than max_row_tokens={max_row_tokens} (up to {worst} "
            f"tokens; indices {describe_indices([i for i, _ in too_long])}): raise `max_row_tokens` or lower "
            "`max_length`"
        )
    if not problems:
        return dataset
    message = f"The {dataset_name} dataset has " + "; ".join(problems) + "."
    if not drop_invalid:
        raise ValueError(message + " Set `drop_invalid_examples=True` to drop them with a warning.")
    bad = set(empty) | {i for i, _ in too_long}
    logger.warning("%s Dropping them (drop_invalid_examples=True).", message)
    return dataset.select([i for i in range(len(dataset)) if i not in bad])

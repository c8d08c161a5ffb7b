"""Which packed row each document goes to, and how long the rows are."""

from __future__ import annotations

import torch


def assign_rows(lengths: list[int], max_row_tokens: int | None, pack: bool = True) -> list[list[int]]:
    """Greedy first-fit in order: documents fill the current row until the next one would pass the budget.

    A document longer than the budget gets a row of its own (the trainer rejects such examples up front, so this is
    only reached by direct callers of the layout). ``pack=False`` gives every document its own row (the
    "sharing without packing" ablation).
    """
    if not pack:
        return [[index] for index in range(len(lengths))]
    if max_row_tokens is None:
        return [list(range(len(lengths)))] if lengths else []
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if current and used + length > max_row_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        rows.append(current)
    return rows


def round_up(value: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return value
    return -(-value // multiple) * multiple


def spans(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For runs of the given lengths laid end to end: each element's run id and its offset inside the run."""
    run = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return run, torch.arange(int(lengths.sum())) - starts[run]

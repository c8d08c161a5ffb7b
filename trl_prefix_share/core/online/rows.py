"""Online RL rows -> shared-prefix documents: one document per distinct prompt, one branch per distinct completion.

GRPO and RLOO score rows of a left-padded prompt followed by a right-padded completion (``[B, P + C]``, the last
``C = logits_to_keep`` columns are the completion). Rows whose prompt tokens are identical (the ``num_generations``
completions of one prompt) become one document; identical completions of one prompt are scored once. Each sequence
keeps the position ids its stock row gives it (the column index: transformers numbers a row without
``position_ids`` by ``arange``), so the packed forward sees the same positions as the stock one.

Grouping is one ``torch.unique`` over the prompt block; Python then runs once per row (not per token) to describe
the sequences, as the preference collators do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trl_prefix_share.core.layout import DocumentSpec, SequenceSpec, make_document, move_to_device, pack_documents
from trl_prefix_share.core.packing import PackingOptions


@dataclass(frozen=True)
class RowShape:
    """What a batch of online-RL rows holds, read from its attention mask (no device sync beyond one copy)."""

    prompt_lengths: torch.Tensor  # [B] real prompt tokens (the prompt block is left-padded)
    completion_lengths: torch.Tensor  # [B] real completion tokens (the completion block is right-padded)
    prompt_groups: torch.Tensor  # [B] id of the row's distinct prompt, numbered by first appearance

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_groups.max()) + 1 if self.prompt_groups.numel() else 0


class UnshareableRows(ValueError):
    """The rows are not laid out as left-padded prompt + right-padded completion (or a prompt is empty): the caller
    scores them the stock way, which is exact by definition."""


def read_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> RowShape:
    """Check the stock row layout and find each row's prompt group; raise ``UnshareableRows`` when it is not TRL's."""
    width = input_ids.size(1) - logits_to_keep
    if width <= 0:
        raise UnshareableRows("the rows have no prompt columns")
    mask = attention_mask.bool().cpu()
    ids = input_ids.cpu()
    prompt_mask, completion_mask = mask[:, :width], mask[:, width:]
    prompt_lengths = prompt_mask.sum(dim=1)
    completion_lengths = completion_mask.sum(dim=1)
    left_padded = torch.arange(width)[None, :] >= (width - prompt_lengths)[:, None]
    right_padded = torch.arange(logits_to_keep)[None, :] < completion_lengths[:, None]
    if not torch.equal(prompt_mask, left_padded) or not torch.equal(completion_mask, right_padded):
        raise UnshareableRows("the attention mask has holes (not a left-padded prompt + right-padded completion)")
    if bool((prompt_lengths == 0).any()):
        rows = (prompt_lengths == 0).nonzero().flatten().tolist()
        raise UnshareableRows(f"rows {rows} have an empty prompt")
    keys = ids[:, :width].masked_fill(~prompt_mask, -1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    # Renumber by first appearance so documents follow the batch order.
    first_row = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long)
    first_row.scatter_reduce_(0, inverse, torch.arange(len(inverse)), reduce="amin")
    rank = torch.empty_like(first_row)
    rank[first_row.argsort()] = torch.arange(len(first_row))
    return RowShape(prompt_lengths, completion_lengths, rank[inverse])


def completion_documents(
    input_ids: torch.Tensor, shape: RowShape, logits_to_keep: int, share_prefix: bool = True
) -> list[DocumentSpec]:
    """One document per distinct prompt (rows in batch order); virtual rows are the batch rows."""
    ids = input_ids.cpu()
    width = ids.size(1) - logits_to_keep
    members: list[list[SequenceSpec]] = [[] for _ in range(shape.num_prompts)]
    lengths = (shape.prompt_lengths.tolist(), shape.completion_lengths.tolist(), shape.prompt_groups.tolist())
    rows = zip(*lengths, strict=True)
    for row, (prompt_length, completion_length, group) in enumerate(rows):
        pad = width - prompt_length
        members[group].append(
            SequenceSpec(
                tokens=ids[row, pad : width + completion_length],
                completion_start=prompt_length,
                virtual_row=row,
                position_offset=pad,
            )
        )
    if not share_prefix:
        return [make_document([seq], share_prefix=False) for group in members for seq in group]
    return [make_document(group) for group in members]


def pack_completion_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    pad_token_id: int,
    options: PackingOptions,
) -> dict[str, torch.Tensor | list[dict[str, torch.Tensor]]]:
    """The packed layout of a batch of online-RL rows, on the rows' device; raises ``UnshareableRows``."""
    ids = input_ids.cpu()  # the layout is described on the host, once
    shape = read_rows(ids, attention_mask.cpu(), logits_to_keep)
    documents = completion_documents(ids, shape, logits_to_keep, options.share_prefix)
    packed = pack_documents(
        documents,
        num_virtual_rows=input_ids.size(0),
        virtual_length=input_ids.size(1),
        pad_token_id=pad_token_id,
        **options.layout_kwargs(),
    )
    return move_to_device(packed, input_ids.device)


def chunk_by_prompt(shape: RowShape, row_tokens: torch.Tensor, budget_rows: int, row_width: int) -> list[torch.Tensor]:
    """Split rows into chunks of whole prompt groups, each holding at most the tokens of ``budget_rows`` stock rows.

    TRL chunks a pass into ``batch_size`` rows to bound memory. A packed chunk of whole groups costs fewer tokens than
    the same rows padded, so chunks are filled with groups up to the stock chunk's ``budget_rows * row_width`` tokens
    (the prompt counted once per group): a group is split only when it alone is larger, then into ``budget_rows`` rows
    at a time. Returns row indices per chunk (groups in order of first appearance).
    """
    budget = budget_rows * row_width
    chunks: list[torch.Tensor] = []
    current: list[torch.Tensor] = []
    used = 0
    for group in range(shape.num_prompts):
        rows = (shape.prompt_groups == group).nonzero().flatten()
        cost = int(shape.prompt_lengths[rows[0]]) + int((row_tokens[rows] - shape.prompt_lengths[rows] + 1).sum())
        if cost > budget:
            if current:
                chunks.append(torch.cat(current))
                current, used = [], 0
            chunks.extend(rows.split(budget_rows))
            continue
        if current and used + cost > budget:
            chunks.append(torch.cat(current))
            current, used = [], 0
        current.append(rows)
        used += cost
    if current:
        chunks.append(torch.cat(current))
    return chunks

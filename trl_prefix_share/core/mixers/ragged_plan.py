"""Index tensors that let a mixer's convolution and chunked scan run on the packed tokens themselves, built once per
step from the layout and shared by every mixer layer and every forward of the step.

A packed layout is a flat run of segments: each shared prefix (from a zero state), each branch (from the state at the
end of its document's prefix, or from zero when the document shares nothing), and row padding (in no segment). The
unpadded ("ragged") run computes the mixer's projections once over all packed tokens, then

- the causal convolution over one gathered sequence where every segment is preceded by the ``K - 1`` inputs its
  convolution must see (its parent prefix's last inputs, or zeros): one convolution call, no padding but those
  columns (`conv_gather`);
- the chunked scan over chunks cut per segment (only a segment's last chunk is padded), phase one batched over every
  chunk, phase two a loop over chunk index in which all segments that still have a chunk advance together: the
  prefixes first, then the branches from their prefixes' final states (`chunk_schedule`).

Everything is vectorised over segments and tokens; Python loops run over segments (once per step) or over chunk
steps, never over tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from trl_prefix_share.core.mixers.segments import token_runs

#: transformers' and flash-linear-attention's chunk length for the gated delta rule.
DELTA_CHUNK = 64


@dataclass(frozen=True)
class ConvGather:
    """``source [Z]``: flat token index of each slot of the gathered sequence (``num_tokens`` for a zero column);
    ``output [num_tokens]``: for each flat token, its column in the valid convolution's output (``Z - K + 1`` for a
    token in no segment, a zero column appended there)."""

    source: torch.Tensor
    output: torch.Tensor


@dataclass(frozen=True)
class ChunkSchedule:
    """The chunks of every segment and the order the scan takes them in.

    Attributes:
        slots: ``[chunks, chunk]`` flat token index of each chunk slot (``num_tokens``: a zero slot past a segment).
        output: ``[num_tokens]`` each flat token's slot in ``slots.reshape(-1)`` (``slots.numel()``: none).
        steps: per level (0: segments from a zero state, 1: branches from their prefix), ``(first_chunk, active)``
            for each chunk step: the chunks ``first_chunk : first_chunk + active`` belong to the level's first
            ``active`` segments (sorted by chunk count, longest first), so their states are the state tensor's first
            ``active`` rows.
        level_sizes: how many segments each level has.
        parent_rank: for each level-1 segment (in its level's order), its parent's row among level 0's final states.
    """

    slots: torch.Tensor
    output: torch.Tensor
    steps: tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]
    level_sizes: tuple[int, int]
    parent_rank: torch.Tensor


@dataclass
class RaggedPlan:
    """The segments of one packed layout in flat token order (on the CPU): ``starts``, ``lengths`` and ``parents``
    (index of the segment a branch continues from, -1 for a zero state). Convolution gathers and chunk schedules are
    built on first use for each kernel or chunk size and device, and kept for the step."""

    starts: torch.Tensor
    lengths: torch.Tensor
    parents: torch.Tensor
    num_tokens: int
    _built: dict = field(default_factory=dict)

    def conv_gather(self, kernel_size: int, device: torch.device) -> ConvGather:
        key = ("conv", kernel_size, str(device))
        if key not in self._built:
            gather = _conv_gather(self, kernel_size)
            self._built[key] = ConvGather(gather.source.to(device), gather.output.to(device))
        return self._built[key]

    def chunk_schedule(self, device: torch.device, chunk: int = DELTA_CHUNK) -> ChunkSchedule:
        key = ("chunks", chunk, str(device))
        if key not in self._built:
            schedule = _chunk_schedule(self, chunk)
            self._built[key] = ChunkSchedule(
                schedule.slots.to(device),
                schedule.output.to(device),
                schedule.steps,
                schedule.level_sizes,
                schedule.parent_rank.to(device),
            )
        return self._built[key]


def build_ragged_plan(document_ids: torch.Tensor, branch_ids: torch.Tensor) -> RaggedPlan:
    """The segments of packed rows (``[rows, T]`` document and branch ids, -1 on row padding; branch 0 is a document's
    shared prefix), each branch pointing at its document's prefix segment."""
    starts, lengths, documents, branches = token_runs(document_ids.cpu(), branch_ids.cpu())
    is_prefix = branches == 0
    prefix_of_document = torch.full((int(documents.max()) + 1 if len(documents) else 1,), -1, dtype=torch.long)
    prefix_of_document[documents[is_prefix]] = is_prefix.nonzero().squeeze(1)
    parents = torch.where(is_prefix, -1, prefix_of_document[documents])
    return RaggedPlan(starts, lengths, parents, document_ids.numel())


def _conv_gather(plan: RaggedPlan, kernel_size: int) -> ConvGather:
    history = kernel_size - 1
    block = plan.lengths + history
    offsets = torch.cumsum(block, 0) - block
    total = int(block.sum())
    segment = torch.repeat_interleave(torch.arange(len(block)), block)
    local = torch.arange(total) - offsets[segment]
    is_token = local >= history
    token_source = plan.starts[segment] + local - history
    # History slot m of a branch: its parent's input `history - m` positions before the parent's end, if it exists.
    parent = plan.parents[segment].clamp(min=0)
    back = plan.lengths[parent] - history + local
    has_history = (plan.parents[segment] >= 0) & (back >= 0)
    history_source = torch.where(has_history, plan.starts[parent] + back, plan.num_tokens)
    source = torch.where(is_token, token_source, history_source)
    outputs = total - history
    output = torch.full((plan.num_tokens,), outputs, dtype=torch.long)
    output[token_source[is_token]] = torch.arange(total)[is_token] - history
    return ConvGather(source, output)


def _chunk_schedule(plan: RaggedPlan, chunk: int) -> ChunkSchedule:
    counts = (plan.lengths + chunk - 1) // chunk
    levels = [(plan.parents < 0).nonzero().squeeze(1), (plan.parents >= 0).nonzero().squeeze(1)]
    rank = torch.empty_like(plan.lengths)
    order_chunks, steps, first = [], [], 0
    levels = [members[torch.argsort(counts[members], descending=True, stable=True)] for members in levels]
    for members in levels:
        rank[members] = torch.arange(len(members))
        member_counts = counts[members].tolist()
        descending = [-count for count in member_counts]
        level_steps = []
        for index in range(member_counts[0] if member_counts else 0):
            active = bisect.bisect_left(descending, -index)  # counts sorted descending
            level_steps.append((first, active))
            order_chunks.append(torch.stack([members[:active], torch.full((active,), index)], dim=1))
            first += active
        steps.append(tuple(level_steps))
    pairs = torch.cat(order_chunks) if order_chunks else torch.zeros((0, 2), dtype=torch.long)
    segment, index = pairs[:, 0], pairs[:, 1]
    position = index[:, None] * chunk + torch.arange(chunk)[None, :]
    inside = position < plan.lengths[segment][:, None]
    slots = torch.where(inside, plan.starts[segment][:, None] + position, plan.num_tokens)
    output = torch.full((plan.num_tokens,), slots.numel(), dtype=torch.long)
    output[slots[inside]] = torch.arange(slots.numel()).view_as(slots)[inside]
    parent_rank = rank[plan.parents[levels[1]]]
    return ChunkSchedule(slots, output, (steps[0], steps[1]), (len(levels[0]), len(levels[1])), parent_rank)

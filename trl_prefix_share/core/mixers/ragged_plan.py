"""Index tensors that let a mixer's convolution and chunked scan run on the packed tokens themselves, built once per
step from the layout and shared by every mixer layer and every forward of the step.

A packed layout is a flat run of segments, one per node of a prefix tree: each root from a zero state, every other
node from the state at the end of its parent node (a one-level document: a prefix and its branches), and row padding
(in no segment). The unpadded ("ragged") run computes the mixer's projections once over all packed tokens, then

- the causal convolution over one gathered sequence where every segment is preceded by the ``K - 1`` inputs its
  convolution must see (the last inputs of its chain of ancestors, or zeros): one convolution call, no padding but
  those columns (`conv_gather`);
- the chunked scan over chunks cut per segment (only a segment's last chunk is padded), phase one batched over every
  chunk, phase two a loop over chunk index in which all segments that still have a chunk advance together, one tree
  depth after the other: roots from zero, then each depth from its parents' final states (`chunk_schedule`).

Everything is vectorised over segments and tokens; Python loops run over segments (once per step) or over chunk
steps, never over tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from trl_prefix_share.core.mixers.segments import token_runs, tree_parents

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
        steps: per level (tree depth; 0: segments from a zero state), ``(first_chunk, active)`` for each chunk step:
            the chunks ``first_chunk : first_chunk + active`` belong to the level's first ``active`` segments (sorted
            by chunk count, longest first), so their states are the state tensor's first ``active`` rows.
        level_sizes: how many segments each level has.
        parent_rank: per level (level 0: empty), for each of its segments in its level's order, its parent's row
            among the previous level's final states.
    """

    slots: torch.Tensor
    output: torch.Tensor
    steps: tuple[tuple[tuple[int, int], ...], ...]
    level_sizes: tuple[int, ...]
    parent_rank: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class VarlenLevels:
    """The segments of one packed layout by tree depth, for a variable-length kernel (one call per depth).

    Attributes:
        tokens: per depth, the flat token indices of its segments laid end to end (segments in flat order).
        cu_seqlens: per depth, ``[segments + 1]`` cumulative lengths of those segments.
        parent_rank: per depth (depth 0: empty), each segment's parent's position among the previous depth's segments.
    """

    tokens: tuple[torch.Tensor, ...]
    cu_seqlens: tuple[torch.Tensor, ...]
    parent_rank: tuple[torch.Tensor, ...]


@dataclass
class RaggedPlan:
    """The segments of one packed layout in flat token order (on the CPU): ``starts``, ``lengths`` and ``parents``
    (index of the segment a node continues from, -1 for a zero state). Convolution gathers and chunk schedules are
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
                tuple(rank.to(device) for rank in schedule.parent_rank),
            )
        return self._built[key]

    def varlen_levels(self, device: torch.device) -> VarlenLevels:
        key = ("varlen", str(device))
        if key not in self._built:
            levels = _varlen_levels(self)
            self._built[key] = VarlenLevels(
                *(
                    tuple(t.to(device) for t in field)
                    for field in (levels.tokens, levels.cu_seqlens, levels.parent_rank)
                )
            )
        return self._built[key]


def build_ragged_plan(document_ids: torch.Tensor, branch_ids: torch.Tensor, span_ends: torch.Tensor) -> RaggedPlan:
    """The segments of packed rows (``[rows, T]`` document and branch ids, -1 on row padding, and the layout's
    subtree ends), each pointing at its parent node's segment."""
    starts, lengths, _, _ = token_runs(document_ids.cpu(), branch_ids.cpu())
    return RaggedPlan(starts, lengths, tree_parents(starts, lengths, span_ends.cpu()), document_ids.numel())


def _conv_gather(plan: RaggedPlan, kernel_size: int) -> ConvGather:
    history = kernel_size - 1
    block = plan.lengths + history
    offsets = torch.cumsum(block, 0) - block
    total = int(block.sum())
    segment = torch.repeat_interleave(torch.arange(len(block)), block)
    local = torch.arange(total) - offsets[segment]
    is_token = local >= history
    token_source = plan.starts[segment] + local - history
    # History slot m of a segment: the input ``history - m`` positions before its start along its chain of
    # ancestors: in its parent when the parent is long enough, else further up (each ancestor holds >= 1 token, so
    # ``history`` climbs reach any slot), zero past a root.
    ancestor = plan.parents[segment]
    back = plan.lengths[ancestor.clamp(min=0)] - history + local
    for _ in range(history):
        climb = (back < 0) & (ancestor >= 0)
        if not bool(climb.any()):
            break
        ancestor = torch.where(climb, plan.parents[ancestor.clamp(min=0)], ancestor)
        back = torch.where(climb & (ancestor >= 0), back + plan.lengths[ancestor.clamp(min=0)], back)
    has_history = (ancestor >= 0) & (back >= 0)
    history_source = torch.where(has_history, plan.starts[ancestor.clamp(min=0)] + back, plan.num_tokens)
    source = torch.where(is_token, token_source, history_source)
    outputs = total - history
    output = torch.full((plan.num_tokens,), outputs, dtype=torch.long)
    output[token_source[is_token]] = torch.arange(total)[is_token] - history
    return ConvGather(source, output)


def _depths(parents: torch.Tensor) -> torch.Tensor:
    """Tree depth of every segment (parents come before their children)."""
    depth = torch.zeros_like(parents)
    for index, parent in enumerate(parents.tolist()):
        if parent >= 0:
            depth[index] = depth[parent] + 1
    return depth


def _varlen_levels(plan: RaggedPlan) -> VarlenLevels:
    depth = _depths(plan.parents)
    rank = torch.empty_like(plan.lengths)
    tokens, cu_seqlens, parent_rank = [], [], []
    for level in range(int(depth.max()) + 1 if len(depth) else 0):
        members = (depth == level).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
        lengths = plan.lengths[members]
        ends = torch.cumsum(lengths, 0)
        segment = torch.repeat_interleave(torch.arange(len(members)), lengths)
        local = torch.arange(int(ends[-1])) - (ends - lengths)[segment]
        tokens.append(plan.starts[members][segment] + local)
        cu_seqlens.append(torch.cat([ends.new_zeros(1), ends]))
        parent_rank.append(rank[plan.parents[members]] if level else torch.zeros(0, dtype=torch.long))
    return VarlenLevels(tuple(tokens), tuple(cu_seqlens), tuple(parent_rank))


def _chunk_schedule(plan: RaggedPlan, chunk: int) -> ChunkSchedule:
    counts = (plan.lengths + chunk - 1) // chunk
    depth = _depths(plan.parents)
    num_levels = int(depth.max()) + 1 if len(depth) else 1
    rank = torch.empty_like(plan.lengths)
    order_chunks, steps, first = [], [], 0
    levels = [(depth == level).nonzero().squeeze(1) for level in range(num_levels)]
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
    parent_rank = tuple(
        rank[plan.parents[members]] if level else torch.zeros(0, dtype=torch.long)
        for level, members in enumerate(levels)
    )
    return ChunkSchedule(slots, output, tuple(steps), tuple(len(members) for members in levels), parent_rank)

"""The runs of a packed layout that a state-carrying mixer must process on their own, built once per step.

A packed row holds documents laid out as ``[shared prefix | branch 1 | branch 2 | ...]``. A recurrent mixer must see
each shared prefix from a zero state, and each branch from the state at the end of its document's prefix (a zero
state when the document shares nothing). The branches run as right-padded batches (padding after a branch never
reaches it, and a branch's own final state is not needed). The prefixes run either as left-padded batches, for mixers
whose state stays zero over zeroed padding (`kinds.left_padding_keeps_zero_state`), or grouped by exact length, each
group an unpadded batch, whose final states are exact for any mixer. Padded batches are cut into length buckets that
balance padding against calls (`length_buckets`): a mixer computes every padded slot, so one batch padded to its
longest segment would spend on padding what sharing saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: A branch batch is at least this wide: a mixer given an initial state and one position takes its in-place decode
#: step, which would overwrite the state another branch still needs.
MIN_BRANCH_WIDTH = 2
#: What one more mixer call costs, in padded token slots (about one chunk of the chunked scans' sequential loop).
CALL_COST_TOKENS = 64
#: Bucketing looks this many segments back (it is a dynamic programme over the sorted lengths).
BUCKET_LOOKBACK = 128


@dataclass(frozen=True)
class SegmentBatch:
    """One mixer call: flat packed indices ``[n, width]``, which slots are real tokens (None: all), and the ids of the
    ``n`` segments (prefix ids for a prefix call, branch ids for a branch call)."""

    index: torch.Tensor
    valid: torch.Tensor | None
    members: torch.Tensor

    def to(self, device: torch.device) -> SegmentBatch:
        valid = None if self.valid is None else self.valid.to(device)
        return SegmentBatch(self.index.to(device), valid, self.members.to(device))


@dataclass(frozen=True)
class MixerSegments:
    """The calls of a segmented mixer run over one packed layout.

    ``prefix_calls`` are left-padded length buckets when ``left_padded``, else unpadded calls of one exact length
    each; ``branch_parent[b]`` is the prefix id of branch ``b`` plus one, 0 for a zero state.
    """

    prefix_calls: tuple[SegmentBatch, ...]
    left_padded: bool
    branch_buckets: tuple[SegmentBatch, ...]
    branch_parent: torch.Tensor
    num_prefixes: int
    num_tokens: int

    def to(self, device: torch.device) -> MixerSegments:
        def move(batches: tuple[SegmentBatch, ...]) -> tuple[SegmentBatch, ...]:
            return tuple(batch.to(device) for batch in batches)

        return MixerSegments(
            move(self.prefix_calls),
            self.left_padded,
            move(self.branch_buckets),
            self.branch_parent.to(device),
            self.num_prefixes,
            self.num_tokens,
        )


def token_runs(document_ids: torch.Tensor, branch_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Start (flat index), length, document and branch of every run of real tokens with one (document, branch)."""
    width = document_ids.size(1)
    document, branch = document_ids.reshape(-1), branch_ids.reshape(-1)
    real = document >= 0
    flat = torch.arange(document.numel())
    starts_run = torch.ones_like(real)
    starts_run[1:] = (document[1:] != document[:-1]) | (branch[1:] != branch[:-1]) | (flat[1:] % width == 0)
    run_of_token = torch.cumsum(starts_run, 0) - 1
    run_index = torch.unique(run_of_token[real])
    lengths = torch.bincount(run_of_token[real], minlength=int(run_of_token[-1]) + 1)[run_index]
    starts = flat[starts_run][run_index]
    return starts, lengths, document[starts], branch[starts]


def tree_parents(starts: torch.Tensor, lengths: torch.Tensor, span_ends: torch.Tensor) -> torch.Tensor:
    """For runs in flat order (each one tree node), the index of the run each continues from (its parent node), -1
    for a root. ``span_ends``: the layout's ``[rows, T]`` row-local subtree ends. Trees are laid out depth first, so
    a run's parent is the nearest earlier run whose subtree holds its first token (a stack, once per run)."""
    width = span_ends.size(1)
    flat_end = (starts // width) * width + span_ends.reshape(-1)[starts]
    parents = torch.full_like(starts, -1)
    open_runs: list[tuple[int, int]] = []  # (run, flat subtree end), innermost last
    for run, (start, end) in enumerate(zip(starts.tolist(), flat_end.tolist(), strict=True)):
        while open_runs and open_runs[-1][1] <= start:
            open_runs.pop()
        if open_runs:
            parents[run] = open_runs[-1][0]
        open_runs.append((run, end))
    return parents


def length_buckets(lengths: list[int], call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` in buckets of similar length, minimising padded slots + ``call_cost`` per bucket.

    An exact dynamic programme over the sorted lengths (each bucket a run of them), looking back at most
    ``BUCKET_LOOKBACK`` segments; once per step, per segment, never per token."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(ordered)
    cut = [0] * (len(ordered) + 1)
    for end in range(1, len(ordered) + 1):
        for start in range(max(0, end - BUCKET_LOOKBACK), end):
            cost = best[start] + (end - start) * ordered[end - 1] + call_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    buckets, end = [], len(ordered)
    while end > 0:
        buckets.append(order[cut[end] : end])
        end = cut[end]
    return buckets[::-1]


def _batch(starts, lengths, members: list[int], min_width: int = 1, left: bool = False) -> SegmentBatch:
    """Indices ``[n, width]`` of the member runs, right-padded (padding after each run) or left-padded (each run
    ending in the last slot); padding slots repeat the run's first token."""
    members_t = torch.tensor(members, dtype=torch.long)
    run_starts, run_lengths = starts[members_t], lengths[members_t]
    width = max(int(run_lengths.max()), min_width)
    slots = torch.arange(width)[None, :]
    if left:
        slots = slots - (width - run_lengths)[:, None]
        valid = slots >= 0
    else:
        valid = slots < run_lengths[:, None]
    index = torch.where(valid, run_starts[:, None] + slots, run_starts[:, None])
    return SegmentBatch(index, None if bool(valid.all()) else valid, members_t)


def build_segments(
    document_ids: torch.Tensor, branch_ids: torch.Tensor, span_ends: torch.Tensor, left_padded: bool
) -> MixerSegments:
    """Cut packed rows (``[rows, T]`` document and branch ids, -1 on row padding; branch 0 is a shared prefix) into
    the calls of a segmented mixer run; ``left_padded``: prefixes in left-padded length buckets (for mixers whose
    state stays zero over zeroed padding), else one unpadded call per prefix length.

    The padded run serves one-level trees only (a prefix and its branches): a node below a branch would need that
    branch's final state, which a right-padded call does not give. Trainers keep such models on one-level layouts
    (``prefix_tree`` resolves to off for them); a deeper layout reaching here is refused, never run wrong."""
    document_ids, branch_ids = document_ids.cpu(), branch_ids.cpu()
    starts, lengths, documents, branches = token_runs(document_ids, branch_ids)
    parents = tree_parents(starts, lengths, span_ends.cpu())
    if bool(((parents >= 0) & (parents[parents.clamp(min=0)] >= 0)).any()):
        raise NotImplementedError(
            "A prefix tree deeper than one level reached a mixer that runs on padded segments (Mamba2 / Kimi delta "
            "mixers, or one whose forward the unpadded run could not read). Set `prefix_tree=False` in the config."
        )
    is_prefix = branches == 0
    prefix_starts, prefix_lengths = starts[is_prefix], lengths[is_prefix]
    prefix_length_list = prefix_lengths.tolist()
    if left_padded:
        prefix_calls = tuple(
            _batch(prefix_starts, prefix_lengths, bucket, left=True) for bucket in length_buckets(prefix_length_list)
        )
    else:
        prefix_calls = tuple(
            _batch(prefix_starts, prefix_lengths, (prefix_lengths == length).nonzero().squeeze(1).tolist())
            for length in sorted(set(prefix_length_list))
        )
    branch_starts, branch_lengths = starts[~is_prefix], lengths[~is_prefix]
    branch_buckets = tuple(
        _batch(branch_starts, branch_lengths, bucket, min_width=MIN_BRANCH_WIDTH)
        for bucket in length_buckets(branch_lengths.tolist())
    )
    prefix_of_document = torch.zeros(int(documents.max()) + 1 if len(documents) else 1, dtype=torch.long)
    prefix_of_document[documents[is_prefix]] = torch.arange(1, len(prefix_starts) + 1)
    branch_parent = prefix_of_document[documents[~is_prefix]]
    return MixerSegments(
        prefix_calls, left_padded, branch_buckets, branch_parent, len(prefix_starts), document_ids.numel()
    )

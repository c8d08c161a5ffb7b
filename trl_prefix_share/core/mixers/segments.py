"""The runs of a packed layout that a state-carrying mixer must process on their own, built once per step.

A packed row holds documents laid out as ``[shared prefix | branch 1 | branch 2 | ...]``. A recurrent mixer must see
each shared prefix from a zero state, and each branch from the state at the end of its document's prefix (a zero
state when the document shares nothing). The branches run as one right-padded batch (padding after a branch never
reaches it, and a branch's own final state is not needed). The prefixes run either as one left-padded batch, for
mixers whose state stays zero over zeroed padding (`kinds.left_padding_keeps_zero_state`), or grouped by length, each
group an unpadded batch, whose final states are exact for any mixer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: A branch batch is at least this wide: a mixer given an initial state and one position takes its in-place decode
#: step, which would overwrite the state another branch still needs.
MIN_BRANCH_WIDTH = 2


@dataclass(frozen=True)
class SegmentBatch:
    """Flat packed indices ``[n, width]`` of one mixer call, and which of them are real tokens."""

    index: torch.Tensor
    valid: torch.Tensor | None  # None: every slot is real (an unpadded prefix group)


@dataclass(frozen=True)
class MixerSegments:
    """Prefix groups (equal lengths, zero initial state) and the branch batch with each branch's initial state.

    ``branch_parent[i]`` indexes the concatenated final states of all prefix groups shifted by one; 0 is the zero
    state of a branch whose document shares nothing.
    """

    prefix_groups: tuple[SegmentBatch, ...]
    branches: SegmentBatch | None
    branch_parent: torch.Tensor
    num_tokens: int
    #: All prefixes in one left-padded batch, in the order of the groups (so the same state ranks); None if none.
    prefixes_left_padded: SegmentBatch | None = None

    def to(self, device: torch.device) -> MixerSegments:
        def move(batch: SegmentBatch) -> SegmentBatch:
            valid = None if batch.valid is None else batch.valid.to(device)
            return SegmentBatch(batch.index.to(device), valid)

        return MixerSegments(
            tuple(move(group) for group in self.prefix_groups),
            None if self.branches is None else move(self.branches),
            self.branch_parent.to(device),
            self.num_tokens,
            None if self.prefixes_left_padded is None else move(self.prefixes_left_padded),
        )


def _runs(document_ids: torch.Tensor, branch_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
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


def _window(starts: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[n, width]`` indices of runs (padding slots repeat the run's first token) and their validity."""
    slots = torch.arange(width)[None, :]
    valid = slots < lengths[:, None]
    return torch.where(valid, starts[:, None] + slots, starts[:, None]), valid


def _left_window(starts: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[n, width]`` indices: each run ends in the last slot."""
    slots = torch.arange(width)[None, :] - (width - lengths)[:, None]
    valid = slots >= 0
    return torch.where(valid, starts[:, None] + slots, starts[:, None]), valid


def build_segments(document_ids: torch.Tensor, branch_ids: torch.Tensor) -> MixerSegments:
    """Cut packed rows (``[rows, T]`` document and branch ids, -1 on row padding; branch 0 is a shared prefix) into
    the prefix groups and the branch batch of a segmented mixer call."""
    document_ids, branch_ids = document_ids.cpu(), branch_ids.cpu()
    starts, lengths, documents, branches = _runs(document_ids, branch_ids)
    is_prefix = branches == 0
    prefix_rank = torch.full((int(documents.max()) + 1 if len(documents) else 1,), -1, dtype=torch.long)
    groups = []
    done = 0
    prefix_starts, prefix_lengths, prefix_documents = starts[is_prefix], lengths[is_prefix], documents[is_prefix]
    ranked = []
    for length in torch.unique(prefix_lengths).tolist():
        members = (prefix_lengths == length).nonzero().squeeze(1)
        index, _ = _window(prefix_starts[members], prefix_lengths[members], length)
        groups.append(SegmentBatch(index, None))
        prefix_rank[prefix_documents[members]] = torch.arange(done, done + len(members))
        ranked.append(members)
        done += len(members)
    left_padded = None
    if ranked:
        order = torch.cat(ranked)
        width = int(prefix_lengths.max())
        left_padded = SegmentBatch(*_left_window(prefix_starts[order], prefix_lengths[order], width))
    branch_starts, branch_lengths = starts[~is_prefix], lengths[~is_prefix]
    branch_batch = None
    if len(branch_starts):
        width = max(int(branch_lengths.max()), MIN_BRANCH_WIDTH)
        branch_batch = SegmentBatch(*_window(branch_starts, branch_lengths, width))
    branch_parent = prefix_rank[documents[~is_prefix]] + 1
    return MixerSegments(tuple(groups), branch_batch, branch_parent, document_ids.numel(), left_padded)

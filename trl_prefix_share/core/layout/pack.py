"""Documents -> packed rows: every tensor of the shared-prefix layout (pure tensor code, no model).

Each document's shared prefix is laid out once and each sequence continues in its own *branch*:

    tokens    : p[0..s-2] | p[s-1] c[..] | p[s-1] r[..]
    positions : 0..s-2    | s-1 ..       | s-1 ..          (every branch restarts at s-1)

The last shared token heads every branch, so each position predicts exactly one next token of its own sequence and
a per-position ``shift_labels`` tensor scores the whole row. Documents are packed greedily into rows.

Every labelled packed position is mapped to its place in the *virtual* stock layout (TRL's padded ``[2B, L]`` batch,
shifted by one), so per-token results can be scattered back there and TRL's loss code runs unchanged.

Python runs once per segment (a shared prefix or a branch) to describe the layout (``_plan_segments``); the tokens
themselves are moved by a fixed number of tensor operations (``_place_tokens``, ``_score_positions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trl_prefix_share.core.layout.documents import IGNORE_INDEX, PAD_DOCUMENT, DocumentSpec, SequenceSpec
from trl_prefix_share.core.layout.rows import assign_rows, round_up
from trl_prefix_share.core.layout.sdpa_groups import AttentionGroup, attention_bucket

Layout = dict[str, torch.Tensor | list[dict[str, torch.Tensor]]]


@dataclass
class _Segment:
    """A run of consecutive tokens of one sequence placed consecutively in a packed row."""

    source: int  # offset in the concatenated token source
    length: int
    dest: int  # flat offset in the packed rows
    position: int  # index in its sequence of its first token
    document: int
    branch: int  # 0: shared prefix
    sequence: int  # index of the sequence whose next tokens it predicts
    weight: int  # stock rows holding these tokens (all sequences of the document for a shared prefix)


@dataclass
class _RowPlan:
    """Which documents share each packed row, and the rows' common (padded) length."""

    members: list[list[int]]
    length: int

    @property
    def num_rows(self) -> int:
        return max(len(self.members), 1)

    @property
    def flat_size(self) -> int:
        return self.num_rows * self.length


@dataclass
class _Sources:
    """Every sequence's tokens end to end (the source the packed rows are gathered from), and where each starts."""

    sequences: list[SequenceSpec]
    tokens: torch.Tensor
    start: list[int]  # offset of each sequence in ``tokens``
    first_sequence: list[int]  # index of each document's first sequence


@dataclass
class _SegmentPlan:
    """The segments of every document, the flat packed index of each sequence's last token, and the attention groups
    of the SDPA decomposition (trunk: a document's first branch with its prefix; side: every later branch)."""

    segments: list[_Segment]
    last_flat: list[int]
    trunk_groups: list[AttentionGroup]
    side_groups: list[AttentionGroup]


@dataclass
class _Placement:
    """Per placed token (flat packed index ``dst``): where it comes from (``src``), its index in its sequence
    (``pos``) and the sequence it belongs to (``owner``); ``seq_info`` holds per sequence
    ``[length, first scored index, virtual row, position offset]``."""

    src: torch.Tensor
    dst: torch.Tensor
    pos: torch.Tensor
    owner: torch.Tensor
    seq_info: torch.Tensor


def _plan_rows(documents: list[DocumentSpec], max_row_tokens: int | None, pad_to_multiple_of: int | None, pack: bool):
    members = assign_rows([doc.num_tokens for doc in documents], max_row_tokens, pack)
    longest = max((sum(documents[i].num_tokens for i in row) for row in members), default=1)
    return _RowPlan(members=members, length=round_up(longest, pad_to_multiple_of))


def _gather_sources(documents: list[DocumentSpec]) -> _Sources:
    sequences = [seq for doc in documents for seq in doc.sequences]
    tokens = torch.cat([seq.tokens for seq in sequences]) if sequences else torch.zeros(0, dtype=torch.long)
    first_sequence, start = [], []
    offset = 0
    for doc in documents:
        first_sequence.append(len(start))
        for seq in doc.sequences:
            start.append(offset)
            offset += len(seq.tokens)
    return _Sources(sequences=sequences, tokens=tokens, start=start, first_sequence=first_sequence)


def _plan_segments(documents: list[DocumentSpec], rows: _RowPlan, sources: _Sources) -> _SegmentPlan:
    """One Python step per shared prefix and per branch: where each run of tokens goes, and its attention group."""
    plan = _SegmentPlan(segments=[], last_flat=[0] * len(sources.sequences), trunk_groups=[], side_groups=[])
    for row, members in enumerate(rows.members):
        dest = row * rows.length
        for doc_index in members:
            doc = documents[doc_index]
            start = doc.branch_start
            first = sources.first_sequence[doc_index]
            shared_dest = dest
            if start:  # shared prefix: scored, if at all, for the document's first sequence
                owner = first + doc.branches[0]
                weight = len(doc.sequences)
                plan.segments.append(_Segment(sources.start[owner], start, dest, 0, doc_index, 0, owner, weight))
                dest += start
            for branch, member in enumerate(doc.branches, start=1):
                index = first + member
                length = len(doc.sequences[member].tokens) - start
                weight = doc.aliases.count(member)
                plan.segments.append(
                    _Segment(sources.start[index] + start, length, dest, start, doc_index, branch, index, weight)
                )
                plan.last_flat[index] = dest + length - 1
                if branch == 1:
                    plan.trunk_groups.append(AttentionGroup(shared_dest, start + length, 0, shared_dest, start, dest))
                else:
                    plan.side_groups.append(AttentionGroup(dest, length, start, shared_dest, start, dest))
                dest += length
    return plan


def _spans(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For runs of the given lengths laid end to end: each element's run id and its offset inside the run."""
    run = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return run, torch.arange(int(lengths.sum())) - starts[run]


def _empty_rows(size: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The flat per-token tensors before any token is placed (padding everywhere)."""
    return {
        "input_ids": torch.full((size,), pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros(size, dtype=torch.long),
        "shift_labels": torch.full((size,), IGNORE_INDEX, dtype=torch.long),
        "document_ids": torch.full((size,), PAD_DOCUMENT, dtype=torch.long),
        "branch_ids": torch.full((size,), PAD_DOCUMENT, dtype=torch.long),
        "token_weights": torch.zeros(size, dtype=torch.long),
        "source_index": torch.full((size,), -1, dtype=torch.long),
    }


def _place_tokens(
    flat: dict[str, torch.Tensor], segments: list[_Segment], sources: _Sources, virtual_length: int
) -> _Placement:
    """Write every segment's tokens, positions, document / branch ids, weights and stock source into the rows."""
    table = torch.tensor(
        [[s.source, s.length, s.dest, s.position, s.document, s.branch, s.sequence, s.weight] for s in segments]
    )
    seg_source, seg_length, seg_dest, seg_position, seg_document, seg_branch, seg_sequence, seg_weight = table.unbind(1)
    run, within = _spans(seg_length)
    src = seg_source[run] + within
    dst = seg_dest[run] + within
    pos = seg_position[run] + within
    seq_info = torch.tensor(
        [[len(q.tokens), q.first_label, q.virtual_row, q.position_offset] for q in sources.sequences]
    )
    owner = seg_sequence[run]
    flat["input_ids"][dst] = sources.tokens[src]
    flat["position_ids"][dst] = pos + seq_info[owner, 3]
    flat["document_ids"][dst] = seg_document[run]
    flat["branch_ids"][dst] = seg_branch[run]
    flat["token_weights"][dst] = seg_weight[run]
    flat["source_index"][dst] = seq_info[owner, 2] * virtual_length + seq_info[owner, 3] + pos
    return _Placement(src=src, dst=dst, pos=pos, owner=owner, seq_info=seq_info)


def _score_positions(
    flat: dict[str, torch.Tensor],
    placed: _Placement,
    documents: list[DocumentSpec],
    sources: _Sources,
    last_flat: list[int],
    num_virtual_rows: int,
    virtual_length: int,
) -> dict[str, torch.Tensor]:
    """Label every position that predicts a scored token, and map it to the shifted virtual layout.

    Position j of a sequence predicts its token j+1 when that token is a completion token. A sequence identical to an
    earlier one of its document is scored from that one's branch: same packed positions, its own virtual row (and
    ``last_flat`` is updated in place to read its last token there).
    """
    info = placed.seq_info
    next_pos = placed.pos + 1
    labelled = (next_pos < info[placed.owner, 0]) & (next_pos >= info[placed.owner, 1])
    label_index = placed.dst[labelled]
    flat["shift_labels"][label_index] = sources.tokens[placed.src[labelled] + 1]
    labelled_owner, labelled_pos = placed.owner[labelled], placed.pos[labelled]
    for doc_index, doc in enumerate(documents):
        first = sources.first_sequence[doc_index]
        for member, alias in enumerate(doc.aliases):
            if alias != member:
                last_flat[first + member] = last_flat[first + alias]
                same = labelled_owner == first + alias
                label_index = torch.cat([label_index, label_index[same]])
                labelled_owner = torch.cat([labelled_owner, labelled_owner[same].fill_(first + member)])
                labelled_pos = torch.cat([labelled_pos, labelled_pos[same]])
    virtual_row = info[labelled_owner, 2]
    return {
        "label_index": label_index,
        "target_index": virtual_row * (virtual_length - 1) + info[labelled_owner, 3] + labelled_pos,
        "branch_lengths": torch.bincount(virtual_row, minlength=num_virtual_rows),
    }


def _last_index(sequences: list[SequenceSpec], last_flat: list[int], num_virtual_rows: int) -> torch.Tensor:
    last_index = torch.zeros(num_virtual_rows, dtype=torch.long)
    if sequences:
        last_index[torch.tensor([q.virtual_row for q in sequences])] = torch.tensor(last_flat)
    return last_index


def pack_documents(
    documents: list[DocumentSpec],
    num_virtual_rows: int,
    virtual_length: int,
    pad_token_id: int,
    max_row_tokens: int | None = None,
    pad_to_multiple_of: int | None = None,
    sdpa_buckets: bool = True,
    pack: bool = True,
    source_index: bool = False,
) -> Layout:
    """Lay documents out in packed rows.

    Args:
        documents: the documents, in batch order.
        num_virtual_rows / virtual_length: shape ``[num_virtual_rows, virtual_length]`` of the stock batch; labelled
            positions are mapped into its shifted ``[num_virtual_rows, virtual_length - 1]`` view.
        pad_token_id: id written into row padding.
        max_row_tokens: token budget per row (``None``: one row).
        pad_to_multiple_of: pad the row length to a multiple of this (bounds recompiles of compiled kernels).
        sdpa_buckets: also build the index/mask tensors of the per-group SDPA decomposition (CPU kernel).
        pack: ``False`` puts every document in its own row, rows padded to the longest (ablation baseline).
        source_index: also return ``source_index`` (needed by image prompts only).

    Returns a dict of tensors: ``input_ids``, ``position_ids``, ``shift_labels``, ``document_ids``, ``branch_ids``
    (all ``[rows, T]``), ``label_index`` (flat packed index of every labelled position, row-major) and
    ``target_index`` (its flat index in the shifted virtual layout), ``token_weights`` (``[rows, T]``, how many
    stock rows hold each packed token: weights of per-token statistics such as the MoE load-balancing loss, 0 on
    row padding), ``branch_lengths`` (labelled tokens per sequence, by virtual row), ``last_index`` (flat packed
    index of each sequence's last token, by virtual row: where a reward model reads its score), and
    ``source_index`` when asked (``[rows, T]``, flat index in the unshifted stock ``[num_virtual_rows, virtual_length]``
    batch of the token each packed position holds, -1 on row padding: how per-token stock inputs such as image
    features, multimodal positions or token types are gathered into the packed rows), and ``attention_buckets`` (a
    list) when ``sdpa_buckets``.
    """
    rows = _plan_rows(documents, max_row_tokens, pad_to_multiple_of, pack)
    sources = _gather_sources(documents)
    plan = _plan_segments(documents, rows, sources)
    flat = _empty_rows(rows.flat_size, pad_token_id)
    scored = {
        "label_index": torch.zeros(0, dtype=torch.long),
        "target_index": torch.zeros(0, dtype=torch.long),
        "branch_lengths": torch.zeros(num_virtual_rows, dtype=torch.long),
    }
    if plan.segments:
        placed = _place_tokens(flat, plan.segments, sources, virtual_length)
        scored = _score_positions(flat, placed, documents, sources, plan.last_flat, num_virtual_rows, virtual_length)

    shape = (rows.num_rows, rows.length)
    names = ("input_ids", "position_ids", "shift_labels", "document_ids", "branch_ids", "token_weights")
    batch: Layout = {name: flat[name].view(shape) for name in names}
    batch.update(scored)
    batch["last_index"] = _last_index(sources.sequences, plan.last_flat, num_virtual_rows)
    if source_index:
        batch["source_index"] = flat["source_index"].view(shape)
    if sdpa_buckets:
        buckets = [(plan.trunk_groups, True), (plan.side_groups, False)]
        batch["attention_buckets"] = [attention_bucket(groups, trunk) for groups, trunk in buckets if groups]
    return batch

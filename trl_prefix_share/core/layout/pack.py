"""Documents -> packed rows: every tensor of the shared-prefix layout (pure tensor code, no model).

Each document's shared prefix is laid out once and each sequence continues in its own *branch*:

    tokens    : p[0..s-2] | p[s-1] c[..] | p[s-1] r[..]
    positions : 0..s-2    | s-1 ..       | s-1 ..          (every branch restarts at s-1)

The last shared token heads every branch, so each position predicts exactly one next token of its own sequence and
a per-position ``shift_labels`` tensor scores the whole row. Documents are packed greedily into rows; with
``prefix_tree`` the documents of a row are then merged into prefix trees (``tree.py``), the same rule at every depth,
and a one-level document is a tree of depth one. Each token carries the end of its node's subtree (``span_ends``),
the whole attention rule.

Every labelled packed position is mapped to its place in the *virtual* stock layout (TRL's padded ``[2B, L]`` batch,
shifted by one), so per-token results can be scattered back there and TRL's loss code runs unchanged.

Python runs once per segment (a tree node) and per (node, sequence) pair to describe the layout (``_plan_segments``);
the tokens themselves are moved by a fixed number of tensor operations (``_place_tokens``, ``_score_positions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trl_prefix_share.core.layout.documents import IGNORE_INDEX, PAD_DOCUMENT, DocumentSpec, SequenceSpec
from trl_prefix_share.core.layout.rows import assign_rows, round_up, spans
from trl_prefix_share.core.layout.sdpa_groups import AttentionGroup, attention_bucket
from trl_prefix_share.core.layout.tree import MIN_SHARED_TOKENS, PrefixTree, document_tree, row_trees

Layout = dict[str, torch.Tensor | list[dict[str, torch.Tensor]]]


@dataclass
class _Segment:
    """A tree node placed in a packed row: a run of consecutive tokens of its owner sequence."""

    source: int  # offset in the concatenated token source
    length: int
    dest: int  # flat offset in the packed rows
    position: int  # index in its sequence of its first token (its depth in the tree)
    document: int  # the tree
    branch: int  # the node's id in its tree: 0 a shared root, 1.. the other nodes depth first
    sequence: int  # the owner: the sequence whose tokens it copies (its stock row and column)
    weight: int  # stock rows holding these tokens (every sequence through the node, aliases included)
    position_offset: int  # the tree's: added to ``position`` to give the position id
    span_end: int  # row-local index where the node's subtree ends (keys of the node are visible up to there)


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
    alias: list[int]  # for each sequence, the sequence it is scored from (itself when unique)


@dataclass
class _SegmentPlan:
    """The nodes of every tree as segments, the scored (node, sequence) spans, the flat packed index of each
    sequence's last token, and the attention groups of the SDPA decomposition (trunk: a tree's first root-to-leaf
    chain, one causal block; side: every other node, its queries over its ancestors and itself)."""

    segments: list[_Segment]
    scored: list[tuple[int, int]]  # (segment index, sequence) for every sequence through every node
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


def _plan_rows(
    documents: list[DocumentSpec],
    sources: _Sources,
    max_row_tokens: int | None,
    pad_to_multiple_of: int | None,
    pack: bool,
    prefix_tree: bool,
    shift_positions: bool,
    min_shared_tokens: int,
) -> tuple[_RowPlan, list[list[PrefixTree]]]:
    """Documents into rows (greedy, by their one-level size, an upper bound of what a tree of them takes), then each
    row's documents into trees: merged across documents with ``prefix_tree``, else one tree per document."""
    members = assign_rows([doc.num_tokens for doc in documents], max_row_tokens, pack)
    trees = []
    for row in members:
        row_docs = [documents[i] for i in row]
        firsts = [sources.first_sequence[i] for i in row]
        if prefix_tree:
            trees.append(row_trees(row_docs, firsts, sources.sequences, shift_positions, min_shared_tokens))
        else:
            trees.append(
                [tree for doc, first in zip(row_docs, firsts, strict=True) for tree in document_tree(doc, first)]
            )
    longest = max((sum(tree.num_tokens for tree in row) for row in trees), default=1)
    return _RowPlan(members=members, length=round_up(max(longest, 1), pad_to_multiple_of)), trees


def _gather_sources(documents: list[DocumentSpec]) -> _Sources:
    sequences = [seq for doc in documents for seq in doc.sequences]
    tokens = torch.cat([seq.tokens for seq in sequences]) if sequences else torch.zeros(0, dtype=torch.long)
    first_sequence, start, alias = [], [], []
    offset = 0
    for doc in documents:
        first = len(start)
        first_sequence.append(first)
        alias.extend(first + member for member in doc.aliases)
        for seq in doc.sequences:
            start.append(offset)
            offset += len(seq.tokens)
    return _Sources(sequences=sequences, tokens=tokens, start=start, first_sequence=first_sequence, alias=alias)


def _plan_segments(trees: list[list[PrefixTree]], rows: _RowPlan, sources: _Sources) -> _SegmentPlan:
    """One Python step per tree node (and per sequence through it): where each node's tokens go, which sequences
    it serves, and its attention group."""
    plan = _SegmentPlan(segments=[], scored=[], last_flat=[0] * len(sources.sequences), trunk_groups=[], side_groups=[])
    copies: dict[int, list[int]] = {}
    for index, alias in enumerate(sources.alias):
        copies.setdefault(alias, []).append(index)
    tree_id = 0
    for row, row_trees_ in enumerate(trees):
        row_start = row * rows.length
        dest = row_start
        for tree in row_trees_:
            sizes = tree.subtree_tokens()
            shared_root = len(tree.nodes) > 1
            node_dest: list[int] = []
            for node_id, node in enumerate(tree.nodes):
                node_dest.append(dest)
                sequences = [copy for member in node.members for copy in copies[member]]
                plan.scored.extend((len(plan.segments), sequence) for sequence in sequences)
                plan.segments.append(
                    _Segment(
                        source=sources.start[node.owner] + node.start,
                        length=node.length,
                        dest=dest,
                        position=node.start,
                        document=tree_id,
                        branch=node_id if shared_root else 1,
                        sequence=node.owner,
                        weight=len(sequences),
                        position_offset=tree.position_offset,
                        span_end=dest - row_start + sizes[node_id],
                    )
                )
                if len(node.members) == 1 and node.stop == len(sources.sequences[node.owner].tokens):
                    for copy in copies[node.owner]:
                        plan.last_flat[copy] = dest + node.length - 1
                dest += node.length
            trunk = tree.trunk()
            trunk_nodes = set(trunk)
            plan.trunk_groups.append(AttentionGroup(node_dest[0], sum(tree.nodes[i].length for i in trunk), 0, ()))
            for node_id in range(len(tree.nodes)):
                if node_id in trunk_nodes:
                    continue
                node = tree.nodes[node_id]
                runs = tuple((node_dest[i], tree.nodes[i].length) for i in tree.ancestors(node_id))
                plan.side_groups.append(AttentionGroup(node_dest[node_id], node.length, node.start, runs))
            tree_id += 1
    return plan


def _empty_rows(size: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The flat per-token tensors before any token is placed (padding everywhere)."""
    return {
        "input_ids": torch.full((size,), pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros(size, dtype=torch.long),
        "shift_labels": torch.full((size,), IGNORE_INDEX, dtype=torch.long),
        "document_ids": torch.full((size,), PAD_DOCUMENT, dtype=torch.long),
        "branch_ids": torch.full((size,), PAD_DOCUMENT, dtype=torch.long),
        "span_ends": torch.full((size,), PAD_DOCUMENT, dtype=torch.long),
        "token_weights": torch.zeros(size, dtype=torch.long),
        "source_index": torch.full((size,), -1, dtype=torch.long),
    }


def _segment_table(segments: list[_Segment]) -> torch.Tensor:
    return torch.tensor(
        [
            [s.source, s.length, s.dest, s.position, s.document, s.branch, s.sequence, s.weight, s.position_offset]
            + [s.span_end]
            for s in segments
        ]
    )


def _place_tokens(
    flat: dict[str, torch.Tensor], table: torch.Tensor, sources: _Sources, virtual_length: int
) -> _Placement:
    """Write every segment's tokens, positions, tree / node ids, subtree ends, weights and stock source into the
    rows."""
    seg_source, seg_length, seg_dest, seg_position, seg_document, seg_branch, seg_sequence, seg_weight = table[
        :, :8
    ].unbind(1)
    seg_offset, seg_span_end = table[:, 8], table[:, 9]
    run, within = spans(seg_length)
    src = seg_source[run] + within
    dst = seg_dest[run] + within
    pos = seg_position[run] + within
    seq_info = torch.tensor(
        [[len(q.tokens), q.first_label, q.virtual_row, q.position_offset] for q in sources.sequences]
    )
    owner = seg_sequence[run]
    flat["input_ids"][dst] = sources.tokens[src]
    flat["position_ids"][dst] = pos + seg_offset[run]
    flat["document_ids"][dst] = seg_document[run]
    flat["branch_ids"][dst] = seg_branch[run]
    flat["span_ends"][dst] = seg_span_end[run]
    flat["token_weights"][dst] = seg_weight[run]
    flat["source_index"][dst] = seq_info[owner, 2] * virtual_length + seq_info[owner, 3] + pos
    return _Placement(src=src, dst=dst, pos=pos, owner=owner, seq_info=seq_info)


def _score_positions(
    flat: dict[str, torch.Tensor],
    table: torch.Tensor,
    scored: list[tuple[int, int]],
    sources: _Sources,
    num_virtual_rows: int,
    virtual_length: int,
) -> dict[str, torch.Tensor]:
    """Label every position that predicts a scored token of any sequence through its node, and map each such
    (position, sequence) pair to the shifted virtual layout.

    Position j of a sequence predicts its token j+1 when that token is scored (``first_label <= j + 1 < length``).
    Inside a node every sequence through it has the same next token, so one packed position may be scored for
    several sequences (a shared prompt token scored by ORPO's NLL for every chosen response; an identical sequence,
    scored from its first copy's positions)."""
    empty = torch.zeros(0, dtype=torch.long)
    pairs = torch.tensor(scored, dtype=torch.long).view(-1, 2)
    segment, sequence = pairs[:, 0], pairs[:, 1]
    info = torch.tensor([[len(q.tokens), q.first_label, q.virtual_row, q.position_offset] for q in sources.sequences])
    start = table[segment, 3]
    stop = start + table[segment, 1]
    low = torch.maximum(start, info[sequence, 1] - 1)
    high = torch.minimum(stop, info[sequence, 0] - 1)
    counts = (high - low).clamp(min=0)
    if int(counts.sum()) == 0:
        return {
            "label_index": empty,
            "target_index": empty,
            "branch_lengths": torch.zeros(num_virtual_rows, dtype=torch.long),
        }
    pair, within = spans(counts)
    depth = low[pair] + within  # j: the predicting position's index in its sequence
    label_index = table[segment[pair], 2] + depth - start[pair]
    owner_source = table[segment[pair], 0] - start[pair]  # source offset of the owner's token 0
    flat["shift_labels"][label_index] = sources.tokens[owner_source + depth + 1]
    labelled = sequence[pair]
    virtual_row = info[labelled, 2]
    return {
        "label_index": label_index,
        "target_index": virtual_row * (virtual_length - 1) + info[labelled, 3] + depth,
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
    prefix_tree: bool = False,
    shift_positions: bool = False,
    min_shared_tokens: int = MIN_SHARED_TOKENS,
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
        prefix_tree: merge the documents of a row into prefix trees (``tree.py``): prompts that agree on their
            first tokens share them, however many documents they come from. ``False``: one-level documents.
        shift_positions: let documents whose sequences start at different position ids merge (each tree numbered
            from its first sequence's offset): exact only for models that see positions through their differences.
        min_shared_tokens: with ``prefix_tree``, the fewest tokens a node shared by different prompts holds
            (``tree.py``); sequences of one prompt share it whatever its length.

    Returns a dict of tensors: ``input_ids``, ``position_ids``, ``shift_labels``, ``document_ids``, ``branch_ids``
    (all ``[rows, T]``), ``label_index`` (flat packed index of every labelled position, row-major) and
    ``target_index`` (its flat index in the shifted virtual layout), ``token_weights`` (``[rows, T]``, how many
    stock rows hold each packed token: weights of per-token statistics such as the MoE load-balancing loss, 0 on
    row padding), ``branch_lengths`` (labelled tokens per sequence, by virtual row), ``last_index`` (flat packed
    index of each sequence's last token, by virtual row: where a reward model reads its score), and
    ``span_ends`` (``[rows, T]``, row-local index where the subtree of each token's node ends, -1 on row padding: key
    ``k`` is visible from query ``q`` of its row iff ``k <= q < span_ends[k]``), ``source_index`` when asked
    (``[rows, T]``, flat index in the unshifted stock ``[num_virtual_rows, virtual_length]`` batch of the token
    each packed position holds, -1 on row padding: how per-token stock inputs such as image features, multimodal
    positions or token types are gathered into the packed rows), and ``attention_buckets`` (a
    list) when ``sdpa_buckets``.
    """
    sources = _gather_sources(documents)
    rows, trees = _plan_rows(
        documents,
        sources,
        max_row_tokens,
        pad_to_multiple_of,
        pack,
        prefix_tree and pack,
        shift_positions,
        min_shared_tokens,
    )
    plan = _plan_segments(trees, rows, sources)
    flat = _empty_rows(rows.flat_size, pad_token_id)
    scored = {
        "label_index": torch.zeros(0, dtype=torch.long),
        "target_index": torch.zeros(0, dtype=torch.long),
        "branch_lengths": torch.zeros(num_virtual_rows, dtype=torch.long),
    }
    if plan.segments:
        table = _segment_table(plan.segments)
        _place_tokens(flat, table, sources, virtual_length)
        scored = _score_positions(flat, table, plan.scored, sources, num_virtual_rows, virtual_length)

    shape = (rows.num_rows, rows.length)
    names = ("input_ids", "position_ids", "shift_labels", "document_ids", "branch_ids", "span_ends", "token_weights")
    batch: Layout = {name: flat[name].view(shape) for name in names}
    batch.update(scored)
    batch["last_index"] = _last_index(sources.sequences, plan.last_flat, num_virtual_rows)
    if source_index:
        batch["source_index"] = flat["source_index"].view(shape)
    if sdpa_buckets:
        buckets = [(plan.trunk_groups, True), (plan.side_groups, False)]
        batch["attention_buckets"] = [attention_bucket(groups, trunk) for groups, trunk in buckets if groups]
    return batch

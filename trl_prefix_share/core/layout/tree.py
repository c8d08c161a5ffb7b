"""Prefix trees: the sequences of one packed row merged into a trie of token spans, each span laid out once.

A row's sequences (prompt + response rows, chosen / rejected pairs, ranked lists, from any number of documents) are
merged by their prompt tokens: sequences that agree on their first tokens share one *node* for them, and split into
child nodes where they differ. Only prompt tokens are shared (a sequence's ``completion_start`` bounds it), so every
sequence ends in a leaf of its own (identical sequences of one document, its aliases, are scored from one leaf).

A node that the sequences ``S`` share holds their common tokens ``[start, stop)`` with ``stop = L - 1`` for their
longest common prefix ``L``: the last common token heads each child instead, so that every laid-out position predicts
exactly one next token of every sequence through it (the one-level layout's rule, applied at every depth). Nodes are
listed depth first (a node, then its subtrees in batch order), so a subtree is one contiguous run of the row: a key is
visible from a query iff it lies before the query and the query lies inside the key's subtree (``span_end``).

A node that several documents share with different prompts is laid out only when it holds at least
``min_shared_tokens`` tokens (a system prompt, tool schemas, earlier turns) or when leaving it out would part one
document's sequences: every node is one more depth for a state-carrying mixer's scan and more attention groups, which
a few shared template tokens (hh's "\n\nHuman:") do not pay for. A node left out hands its tokens to each child (a
child shared by different prompts then counts them towards its own minimum). Sequences with one prompt (a document's
responses, pairs that repeat a prompt) always share it, and no document's tree takes more tokens than its one-level
layout, whatever the minimum.

Python runs once per node and per (node, sequence) pair, never per token; comparing tokens is one tensor operation
per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trl_prefix_share.core.layout.documents import DocumentSpec, SequenceSpec

#: Tokens a node shared by different prompts must hold (``PrefixShareArguments.prefix_tree_min_shared_tokens``).
MIN_SHARED_TOKENS = 32


@dataclass(frozen=True)
class TreeNode:
    """A span ``[start, stop)`` of the tokens of every sequence in ``members`` (unique sequences, by index in the
    row's sequence list), copied from ``owner``; ``parent`` is the index of the parent node in the tree, -1 for a
    root."""

    owner: int
    start: int
    stop: int
    parent: int
    members: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class PrefixTree:
    """The nodes of one tree, depth first; ``position_offset`` is added to every node's depth to give its position
    id (one offset per tree, see ``merge_key``)."""

    nodes: tuple[TreeNode, ...]
    position_offset: int

    @property
    def num_tokens(self) -> int:
        return sum(node.length for node in self.nodes)

    def subtree_tokens(self) -> list[int]:
        """Tokens of each node's subtree (the node itself included)."""
        sizes = [node.length for node in self.nodes]
        for index in range(len(self.nodes) - 1, -1, -1):
            parent = self.nodes[index].parent
            if parent >= 0:
                sizes[parent] += sizes[index]
        return sizes

    def trunk(self) -> list[int]:
        """The first root-to-leaf chain (each node's first child): contiguous in the row, one causal block."""
        chain = [0]
        for index in range(1, len(self.nodes)):
            if self.nodes[index].parent == chain[-1]:
                chain.append(index)
            else:
                break
        return chain

    def ancestors(self, index: int) -> list[int]:
        """The nodes from the root down to ``index`` (included)."""
        chain = []
        while index >= 0:
            chain.append(index)
            index = self.nodes[index].parent
        return chain[::-1]


def share_limit(seq: SequenceSpec) -> int:
    """How many leading tokens of ``seq`` may be shared: its prompt, never a completion token."""
    return min(seq.completion_start, len(seq.tokens))


def _common_length(tokens: list[torch.Tensor], members: list[int], limits: list[int], known: int) -> int:
    """Longest common prefix of the members' tokens within every member's limit; ``known`` tokens agree already."""
    limit = min(limits[i] for i in members)
    if limit <= known:
        return limit
    stacked = torch.stack([tokens[i][known:limit] for i in members])
    same = (stacked == stacked[:1]).all(dim=0)
    return known + int(same.cumprod(0).sum())


def _split(tokens: list[torch.Tensor], members: list[int], limits: list[int], at: int) -> list[list[int]]:
    """The members cut into groups by their token ``at`` (batch order kept); a member that may not share it is a
    group of its own."""
    groups: dict[object, list[int]] = {}
    for member in members:
        key = ("own", member) if limits[member] <= at else int(tokens[member][at])
        groups.setdefault(key, []).append(member)
    return list(groups.values())


def build_trees(
    sequences: list[SequenceSpec],
    members: list[int],
    position_offset: int,
    min_shared_tokens: int = MIN_SHARED_TOKENS,
    document_of: dict[int, int] | None = None,
) -> list[PrefixTree]:
    """The trie of ``members`` (unique sequences, by index into ``sequences``), as trees in batch order.

    A tree's root shares at least two tokens (one laid-out token saved per extra sequence, as a one-level document)
    and, shared by different prompts, as many as ``_NodeRule`` asks; sequences that share less stand alone as a
    one-node tree. ``document_of``: each member's document (default: one document each)."""
    tokens = [seq.tokens for seq in sequences]
    limits = [share_limit(seq) for seq in sequences]
    keeps = _NodeRule(
        limits, {member: member for member in members} if document_of is None else document_of, min_shared_tokens
    )
    trees: list[PrefixTree] = []
    pending: list[tuple[list[int], int]] = [(members, 0)]  # groups agreeing on their first `known` tokens
    while pending:
        group, known = pending.pop(0)
        if len(group) == 1:
            trees.append(_leaf_tree(sequences, group[0], position_offset))
            continue
        common = _common_length(tokens, group, limits, known)
        parts = _split(tokens, group, limits, common)
        if common >= 2 and keeps(group, 0, common, parts):
            trees.append(PrefixTree(_grow(tokens, limits, group, common, keeps), position_offset))
            continue
        pending[:0] = [(part, common + 1) for part in parts]  # keep batch order
    return trees


class _NodeRule:
    """Whether a node is laid out: the node of ``members``, which agree on their first ``agreed`` tokens, from
    ``start`` (it holds ``[start, agreed - 1)``), its members parted into ``children``."""

    def __init__(self, limits: list[int], document_of: dict[int, int], min_shared_tokens: int) -> None:
        self.limits, self.document_of, self.min_shared_tokens = limits, document_of, min_shared_tokens

    def __call__(self, members: list[int], start: int, agreed: int, children: list[list[int]]) -> bool:
        if agreed - 1 - start >= self.min_shared_tokens:
            return True
        if all(self.limits[member] == agreed for member in members):  # one prompt: its agreed tokens, all of them
            return True
        # Left out, the node would part the sequences of a document that its one-level layout shares.
        child_documents = [{self.document_of[member] for member in child} for child in children]
        return sum(map(len, child_documents)) > len(set().union(*child_documents))


def _leaf_tree(sequences: list[SequenceSpec], member: int, position_offset: int) -> PrefixTree:
    node = TreeNode(member, 0, len(sequences[member].tokens), -1, (member,))
    return PrefixTree((node,), position_offset)


def _grow(
    tokens: list[torch.Tensor], limits: list[int], group: list[int], common: int, keeps: _NodeRule
) -> tuple[TreeNode, ...]:
    """Nodes of the tree whose root the ``group`` shares (``common`` >= 2 tokens), depth first. A node that
    ``keeps`` leaves out hands its start to its children, which then lay its tokens out each."""
    nodes: list[TreeNode] = []
    # (members, tokens they agree on, first laid-out index, parent); a stack, children pushed in reverse order.
    stack: list[tuple[list[int], int, int, int]] = [(group, common, 0, -1)]
    while stack:
        members, agreed, start, parent = stack.pop()
        if len(members) == 1:
            nodes.append(TreeNode(members[0], start, len(tokens[members[0]]), parent, (members[0],)))
            continue
        agreed = _common_length(tokens, members, limits, agreed)
        children = _split(tokens, members, limits, agreed)
        if parent >= 0 and not keeps(members, start, agreed, children):
            for child in reversed(children):
                stack.append((child, agreed + 1 if len(child) > 1 else agreed, start, parent))
            continue
        index = len(nodes)
        nodes.append(TreeNode(members[0], start, agreed - 1, parent, tuple(members)))
        for child in reversed(children):
            stack.append((child, agreed + 1 if len(child) > 1 else agreed, agreed - 1, index))
    return tuple(nodes)


def document_tree(doc: DocumentSpec, first: int) -> list[PrefixTree]:
    """A one-level document as trees: its shared prefix as a root with one leaf per branch, or (nothing shared) one
    single-node tree per branch. ``first``: index of the document's first sequence in the row's sequence list."""
    offset = doc.sequences[0].position_offset
    branches = [first + member for member in doc.branches]
    if doc.branch_start == 0:
        return [
            PrefixTree((TreeNode(index, 0, len(doc.sequences[index - first].tokens), -1, (index,)),), offset)
            for index in branches
        ]
    root = TreeNode(branches[0], 0, doc.branch_start, -1, tuple(branches))
    leaves = tuple(
        TreeNode(index, doc.branch_start, len(doc.sequences[index - first].tokens), 0, (index,)) for index in branches
    )
    return [PrefixTree((root, *leaves), offset)]


def merge_key(doc: DocumentSpec, shift_positions: bool) -> tuple | None:
    """Documents with the same key may merge into one tree; None: the document stays one-level on its own.

    Image prompts stay on their own (the same placeholder tokens stand for different images). Without
    ``shift_positions`` only documents whose sequences all start at one position id merge; with it (models that see
    positions only through their differences, see ``positions.py``) documents of any offset merge, each sequence then
    numbered from its tree's offset instead of its own."""
    if any(seq.prompt_images for seq in doc.sequences):
        return None
    offsets = {seq.position_offset for seq in doc.sequences}
    if shift_positions:
        return ("text",)
    return ("text", *offsets) if len(offsets) == 1 else None


def row_trees(
    documents: list[DocumentSpec],
    first_sequence: list[int],
    sequences: list[SequenceSpec],
    shift_positions: bool,
    min_shared_tokens: int = MIN_SHARED_TOKENS,
) -> list[PrefixTree]:
    """The trees of one row's documents (merged where their ``merge_key`` agrees), in batch order of their first
    sequence. Aliases (identical sequences of one document) are left out: they are scored from their first copy."""
    groups: dict[tuple, list[int]] = {}
    placed: list[tuple[int, list[PrefixTree] | tuple]] = []
    for position, (doc, first) in enumerate(zip(documents, first_sequence, strict=True)):
        key = merge_key(doc, shift_positions)
        if key is None:
            placed.append((position, document_tree(doc, first)))
            continue
        if key not in groups:
            groups[key] = []
            placed.append((position, key))
        groups[key].extend(first + member for member in doc.branches)
    document_of = {  # this row's sequences only: the batch's list may hold many rows
        first + member: position
        for position, (doc, first) in enumerate(zip(documents, first_sequence, strict=True))
        for member in range(len(doc.sequences))
    }
    trees: list[PrefixTree] = []
    for _, entry in placed:
        if isinstance(entry, list):
            trees.extend(entry)
        else:
            members = groups[entry]
            offset = sequences[members[0]].position_offset
            trees.extend(build_trees(sequences, members, offset, min_shared_tokens, document_of))
    return trees

"""Shared-prefix packed layout: tokenized sequences -> packed rows (pure tensor code, no model).

A *document* holds K >= 1 sequences that start with the same prompt. Its shared prefix is laid out once and each
sequence continues in its own *branch*:

    tokens    : p[0..s-2] | p[s-1] c[..] | p[s-1] r[..]
    positions : 0..s-2    | s-1 ..       | s-1 ..          (every branch restarts at s-1)

The last shared token heads every branch, so each position predicts exactly one next token of its own sequence and
a per-position ``shift_labels`` tensor scores the whole row. Documents are packed greedily into rows.

Every labelled packed position is mapped to its place in the *virtual* stock layout (TRL's padded ``[2B, L]`` batch,
shifted by one), so per-token results can be scattered back there and TRL's loss code runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100
PAD_DOCUMENT = -1


@dataclass(frozen=True)
class SequenceSpec:
    """One already-truncated sequence of the stock layout.

    Attributes:
        tokens: 1D token ids of prompt + completion, exactly as the stock batch holds them (no padding).
        completion_start: index in ``tokens`` of the first completion token (``len(tokens)`` if none).
        virtual_row: row of this sequence in the stock ``[num_sequences, L]`` batch.
    """

    tokens: torch.Tensor
    completion_start: int
    virtual_row: int


@dataclass(frozen=True)
class DocumentSpec:
    """Sequences that may share their prompt; ``shared_length`` tokens are identical at the start of all of them."""

    sequences: tuple[SequenceSpec, ...]
    shared_length: int

    @property
    def branch_start(self) -> int:
        """Index in each sequence where its branch starts (the repeated last shared token), 0 when unshared."""
        return self.shared_length - 1 if self.shared_length >= 2 else 0

    @property
    def num_tokens(self) -> int:
        """Tokens this document occupies in a packed row."""
        start = self.branch_start
        return start + sum(len(seq.tokens) - start for seq in self.sequences)


def shareable_length(sequences: list[SequenceSpec]) -> int:
    """Longest prefix that all sequences have in common and that lies inside every prompt.

    Only prompt tokens are shared: a shared position's next-token label is then a prompt token, never scored.
    Returns 0 when fewer than 2 tokens could be shared (nothing would be saved).
    """
    if len(sequences) < 2:
        return 0
    limit = min(min(seq.completion_start for seq in sequences), min(len(seq.tokens) for seq in sequences))
    if limit < 2:
        return 0
    head = sequences[0].tokens[:limit]
    same = torch.ones(limit, dtype=torch.bool)
    for seq in sequences[1:]:
        same &= seq.tokens[:limit] == head
    shared = int(same.cumprod(0).sum())
    return shared if shared >= 2 else 0


def make_document(sequences: list[SequenceSpec], share_prefix: bool = True) -> DocumentSpec:
    """Group sequences into one document, sharing their common prompt prefix when ``share_prefix``."""
    shared = shareable_length(sequences) if share_prefix else 0
    return DocumentSpec(sequences=tuple(sequences), shared_length=shared)


def assign_rows(lengths: list[int], max_row_tokens: int | None) -> list[list[int]]:
    """Greedy first-fit in order: documents fill the current row until the next one would pass the budget.

    A document longer than the budget gets a row of its own (the trainer rejects such examples up front, so this is
    only reached by direct callers of the layout).
    """
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


def _round_up(value: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return value
    return -(-value // multiple) * multiple


@dataclass
class _Group:
    """One attention group: a set of query tokens and the keys they may see (both as flat packed indices)."""

    query_index: torch.Tensor
    query_pos: torch.Tensor
    key_index: torch.Tensor
    key_pos: torch.Tensor


def _attention_bucket(groups: list[_Group]) -> dict[str, torch.Tensor]:
    """Pad a list of groups into batched index tensors and a boolean mask for one SDPA call.

    Keys of a group are in increasing position order, so ``key_pos <= query_pos`` is the causal rule. Padded query
    slots see key slot 0 only, so no softmax row is empty (an empty row would give NaN gradients); their outputs are
    never scattered back.
    """
    query_index = pad_sequence([g.query_index for g in groups], batch_first=True, padding_value=0)
    query_pos = pad_sequence([g.query_pos for g in groups], batch_first=True, padding_value=0)
    key_index = pad_sequence([g.key_index for g in groups], batch_first=True, padding_value=0)
    key_pos = pad_sequence([g.key_pos for g in groups], batch_first=True, padding_value=0)
    query_len = torch.tensor([len(g.query_index) for g in groups])
    key_len = torch.tensor([len(g.key_index) for g in groups])
    query_valid = torch.arange(query_index.size(1))[None, :] < query_len[:, None]
    key_valid = torch.arange(key_index.size(1))[None, :] < key_len[:, None]
    mask = (key_pos[:, None, :] <= query_pos[:, :, None]) & key_valid[:, None, :] & query_valid[:, :, None]
    first_key = torch.zeros(key_index.size(1), dtype=torch.bool)
    first_key[0] = True
    mask |= ~query_valid[:, :, None] & first_key[None, None, :]
    query_slots = query_valid.reshape(-1).nonzero().squeeze(1)
    return {
        "query_index": query_index,
        "key_index": key_index,
        "query_pos": query_pos,
        "key_pos": key_pos,
        "mask": mask.unsqueeze(1),
        "query_slots": query_slots,
        "query_targets": query_index.reshape(-1)[query_slots],
    }


def pack_documents(
    documents: list[DocumentSpec],
    num_virtual_rows: int,
    virtual_length: int,
    pad_token_id: int,
    max_row_tokens: int | None = None,
    pad_to_multiple_of: int | None = None,
    sdpa_buckets: bool = True,
) -> dict[str, torch.Tensor | list[dict[str, torch.Tensor]]]:
    """Lay documents out in packed rows.

    Args:
        documents: the documents, in batch order.
        num_virtual_rows / virtual_length: shape ``[num_virtual_rows, virtual_length]`` of the stock batch; labelled
            positions are mapped into its shifted ``[num_virtual_rows, virtual_length - 1]`` view.
        pad_token_id: id written into row padding.
        max_row_tokens: token budget per row (``None``: one row).
        pad_to_multiple_of: pad the row length to a multiple of this (bounds recompiles of compiled kernels).
        sdpa_buckets: also build the index/mask tensors of the per-group SDPA decomposition (CPU kernel).

    Returns a dict of tensors: ``input_ids``, ``position_ids``, ``shift_labels``, ``document_ids``, ``branch_ids``
    (all ``[rows, T]``), ``label_index`` (flat packed index of every labelled position, row-major) and
    ``target_index`` (its flat index in the shifted virtual layout), ``branch_lengths`` (labelled tokens per
    sequence, by virtual row), and ``attention_buckets`` (a list) when ``sdpa_buckets``.
    """
    row_members = assign_rows([doc.num_tokens for doc in documents], max_row_tokens)
    row_length = _round_up(
        max((sum(documents[i].num_tokens for i in row) for row in row_members), default=1), pad_to_multiple_of
    )
    num_rows = max(len(row_members), 1)
    shifted_width = virtual_length - 1

    input_ids = torch.full((num_rows, row_length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, row_length), dtype=torch.long)
    shift_labels = torch.full((num_rows, row_length), IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.full((num_rows, row_length), PAD_DOCUMENT, dtype=torch.long)
    branch_ids = torch.full((num_rows, row_length), PAD_DOCUMENT, dtype=torch.long)
    label_index: list[torch.Tensor] = []
    target_index: list[torch.Tensor] = []
    branch_lengths = torch.zeros(num_virtual_rows, dtype=torch.long)
    trunk_groups: list[_Group] = []
    side_groups: list[_Group] = []

    for row, members in enumerate(row_members):
        offset = 0
        row_base = row * row_length
        for doc_index in members:
            doc = documents[doc_index]
            start = doc.branch_start
            shared_flat = torch.arange(start) + row_base + offset
            shared_pos = torch.arange(start)
            if start:
                tokens = doc.sequences[0].tokens[:start]
                input_ids[row, offset : offset + start] = tokens
                position_ids[row, offset : offset + start] = shared_pos
                document_ids[row, offset : offset + start] = doc_index
                branch_ids[row, offset : offset + start] = 0
            offset += start
            for branch, seq in enumerate(doc.sequences, start=1):
                length = len(seq.tokens) - start
                span = slice(offset, offset + length)
                pos = torch.arange(start, start + length)
                input_ids[row, span] = seq.tokens[start:]
                position_ids[row, span] = pos
                document_ids[row, span] = doc_index
                branch_ids[row, span] = branch
                # Position j (sequence index) predicts token j+1 when that token is a completion token.
                next_index = pos + 1
                labelled = (next_index < len(seq.tokens)) & (next_index >= seq.completion_start)
                labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
                labels[labelled] = seq.tokens[next_index[labelled]]
                shift_labels[row, span] = labels
                label_index.append(row_base + offset + labelled.nonzero().squeeze(1))
                target_index.append(seq.virtual_row * shifted_width + pos[labelled])
                branch_lengths[seq.virtual_row] = int(labelled.sum())
                if sdpa_buckets:
                    branch_flat = torch.arange(length) + row_base + offset
                    if branch == 1:
                        flat = torch.cat([shared_flat, branch_flat])
                        flat_pos = torch.cat([shared_pos, pos])
                        trunk_groups.append(_Group(flat, flat_pos, flat, flat_pos))
                    else:
                        side_groups.append(
                            _Group(
                                branch_flat, pos, torch.cat([shared_flat, branch_flat]), torch.cat([shared_pos, pos])
                            )
                        )
                offset += length

    batch: dict[str, torch.Tensor | list[dict[str, torch.Tensor]]] = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "shift_labels": shift_labels,
        "document_ids": document_ids,
        "branch_ids": branch_ids,
        "label_index": torch.cat(label_index) if label_index else torch.zeros(0, dtype=torch.long),
        "target_index": torch.cat(target_index) if target_index else torch.zeros(0, dtype=torch.long),
        "branch_lengths": branch_lengths,
    }
    if sdpa_buckets:
        batch["attention_buckets"] = [_attention_bucket(groups) for groups in (trunk_groups, side_groups) if groups]
    return batch

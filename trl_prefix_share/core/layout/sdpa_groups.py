"""The index tensors of the per-group SDPA decomposition (the CPU kernel, ``attention/sdpa_packed.py``).

Every token of a tree is a query in exactly one attention group. A tree's first root-to-leaf chain (its *trunk*) is
contiguous in the row and forms one causal group: its queries are its keys. Every other node forms a *side* group:
its queries, and keys = the node's ancestors and itself, gathered in depth order (root first). Groups of one kind are
batched into one SDPA call, padded to the longest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trl_prefix_share.core.layout.rows import spans


@dataclass
class AttentionGroup:
    """One attention group: contiguous queries starting at depth ``query_position``; a side group's keys are the
    ``key_runs`` ``(flat start, length)`` of its ancestor chain, root first, ending with the queries' own run (so a
    key's slot is its depth). A trunk group's keys are its queries (``key_runs`` unused)."""

    query_start: int
    query_length: int
    query_position: int
    key_runs: tuple[tuple[int, int], ...]


def _side_keys(groups: list[AttentionGroup], width: int) -> torch.Tensor:
    """``[G, width]`` flat key index of each key slot (its depth along the group's chain), 0 past the chain."""
    rows = []
    for g, group in enumerate(groups):
        depth = 0
        for start, length in group.key_runs:
            rows.append([g, start, length, depth])
            depth += length
    owner, run_start, run_length, depth_start = torch.tensor(rows, dtype=torch.long).view(-1, 4).unbind(1)
    run, within = spans(run_length)
    key_index = torch.zeros(len(groups), width, dtype=torch.long)
    key_index[owner[run], depth_start[run] + within] = run_start[run] + within
    return key_index


def attention_bucket(groups: list[AttentionGroup], trunk: bool) -> dict[str, torch.Tensor | bool]:
    """Batched index tensors of one SDPA call over a list of groups (no mask: see ``attention/sdpa_packed.py``).

    A key's slot equals its depth, so query q may see key slot k iff ``k <= query_pos[q]``: valid queries never reach
    padded key slots, and a padded query slot (position 0) sees key slot 0 only, so no softmax row is empty. In a
    trunk group the queries are the keys, so the rule is plain causal attention. Padded query outputs are never
    scattered back.
    """
    table = torch.tensor([[g.query_start, g.query_length, g.query_position] for g in groups])
    q_start, q_len, q_pos = table.unbind(1)
    k_len = q_len if trunk else q_pos + q_len
    slot_q = torch.arange(int(q_len.max()))[None, :]
    slot_k = torch.arange(int(k_len.max()))[None, :]
    query_valid = slot_q < q_len[:, None]
    key_valid = slot_k < k_len[:, None]
    query_index = torch.where(query_valid, q_start[:, None] + slot_q, 0)
    query_pos = torch.where(query_valid, q_pos[:, None] + slot_q, 0)
    # A trunk group's keys are its queries; a side group's are its ancestor chain and itself.
    key_index = torch.where(key_valid, q_start[:, None] + slot_k, 0) if trunk else _side_keys(groups, slot_k.size(1))
    query_slots = query_valid.reshape(-1).nonzero().squeeze(1)
    return {
        "trunk": trunk,
        "query_index": query_index,
        "key_index": key_index,
        "query_pos": query_pos,
        "key_valid": key_valid,
        "query_slots": query_slots,
        "query_targets": query_index.reshape(-1)[query_slots],
    }

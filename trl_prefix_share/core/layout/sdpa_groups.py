"""The index tensors of the per-group SDPA decomposition (the CPU kernel, ``attention/sdpa_packed.py``).

Each branch forms one attention group: its queries, and keys = [shared prefix, the branch]. A document's first branch
is a *trunk* group (its queries include the shared prefix: plain causal attention); every later branch a *side* group.
Groups of one kind are batched into one SDPA call, padded to the longest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionGroup:
    """One attention group: contiguous queries, and keys = [shared prefix, one branch] (positions 0, 1, ...)."""

    query_start: int
    query_length: int
    query_position: int
    shared_start: int
    shared_length: int
    branch_start: int


def attention_bucket(groups: list[AttentionGroup], trunk: bool) -> dict[str, torch.Tensor | bool]:
    """Batched index tensors of one SDPA call over a list of groups (no mask: see ``attention/sdpa_packed.py``).

    Keys of a group are [shared prefix, branch] and a key's slot equals its position, so query q may see key slot k
    iff ``k <= query_pos[q]``: valid queries never reach padded key slots, and a padded query slot (position 0) sees
    key slot 0 only, so no softmax row is empty. In a trunk group the queries are the keys, so the rule is plain
    causal attention. Padded query outputs are never scattered back.
    """
    table = torch.tensor(
        [
            [g.query_start, g.query_length, g.query_position, g.shared_start, g.shared_length, g.branch_start]
            for g in groups
        ]
    )
    q_start, q_len, q_pos, s_start, s_len, b_start = table.unbind(1)
    k_len = q_len if trunk else s_len + q_len
    slot_q = torch.arange(int(q_len.max()))[None, :]
    slot_k = torch.arange(int(k_len.max()))[None, :]
    query_valid = slot_q < q_len[:, None]
    key_valid = slot_k < k_len[:, None]
    query_index = torch.where(query_valid, q_start[:, None] + slot_q, 0)
    query_pos = torch.where(query_valid, q_pos[:, None] + slot_q, 0)
    in_shared = slot_k < s_len[:, None]
    key_index = torch.where(in_shared, s_start[:, None] + slot_k, b_start[:, None] + slot_k - s_len[:, None])
    key_index = torch.where(key_valid, key_index, 0)
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

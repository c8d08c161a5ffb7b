"""CPU kernel: the packed attention decomposed into per-group SDPA calls.

Each group is one block of the block-sparse mask: a document's shared prefix plus its first branch (plain causal),
or a later branch's queries over [shared prefix, own branch]. Groups are padded into one batched SDPA call per bucket,
so no attention is computed across documents or branches, and no Python runs per token.

Layers whose softmax is not SDPA's (logit soft-capping, Gemma 2; attention sinks, GPT-OSS: one extra logit per head
in every softmax row) take the same groups through explicit scores instead (`packed_explicit_attention`).

A trunk group that needs a mask (a sliding window, the explicit softmax) is cut into blocks of `QUERY_BLOCK` query
slots, each over only the key slots it can see (`query_blocks`): its masks (and explicit scores) grow with the trunk's
tokens x (block + window), not with the square of a 16k-token prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trl_prefix_share.core.attention.dense_explicit import softmax_dtype
from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout

#: Query slots per block of a masked trunk group (see `query_blocks`).
QUERY_BLOCK = 1024


def query_blocks(
    bucket: dict[str, torch.Tensor], sliding_window: int | None, needs_mask: bool, image_blocks: torch.Tensor | None
) -> list[tuple[slice, slice]]:
    """``(query slots, key slots)`` blocks that together compute a bucket's attention.

    One block (all queries, all keys) except for a masked trunk group longer than `QUERY_BLOCK`: in a trunk a
    query's slot is its key slot, so the queries ``[a, b)`` see only keys ``[a - window + 1, b)`` (``[0, b)`` without
    a window). Image groups (bidirectional within an image, so a query may see later keys) stay one block."""
    queries, keys = bucket["query_pos"].size(1), bucket["key_index"].size(1)
    if not (bucket["trunk"] and needs_mask and image_blocks is None and queries > QUERY_BLOCK):
        return [(slice(0, queries), slice(0, keys))]
    blocks = []
    for start in range(0, queries, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, queries)
        first_key = 0 if sliding_window is None else max(start - sliding_window + 1, 0)
        blocks.append((slice(start, stop), slice(first_key, stop)))
    return blocks


def bucket_mask(
    bucket: dict[str, torch.Tensor],
    sliding_window: int | None,
    explicit: bool = False,
    image_blocks: torch.Tensor | None = None,
    block: tuple[slice, slice] | None = None,
) -> torch.Tensor | None:
    """Boolean ``[G, 1, Lq, Lk]`` mask of a bucket (of its ``block`` of query and key slots), or ``None`` where plain
    causal attention is exact.

    A key's slot equals its position, so query q sees key slot k iff ``k <= query_pos[q]`` (and, in a sliding-window
    layer, ``query_pos[q] - k < window``: distance in positions, not packed indices). With ``image_blocks`` (Gemma 3)
    a query inside an image also sees the later keys of the same image, as stock's mask does (causal OR same image,
    then the window). A padded query slot that would see no key of its block sees the block's first (its output is
    never used; an empty softmax row would put NaN into the gradients). Built once per step per bucket, block and
    window size, then shared by every layer and by the policy and reference forwards.
    """
    if bucket["trunk"] and sliding_window is None and not explicit and image_blocks is None:
        return None
    queries, keys = block or (slice(None), slice(None))
    query_pos = bucket["query_pos"][:, queries, None]
    key_slots = torch.arange(bucket["key_index"].size(1), device=query_pos.device)[keys]
    key_slot = key_slots[None, None, :]
    mask = key_slot <= query_pos
    if image_blocks is not None:
        flat = image_blocks.reshape(-1)
        query_block = flat[bucket["query_index"][:, queries]][:, :, None]
        key_block = flat[bucket["key_index"][:, keys]][:, None, :]
        mask |= (query_block == key_block) & (query_block >= 0) & bucket["key_valid"][:, None, keys]
    if sliding_window is not None:
        mask &= query_pos - key_slot < sliding_window
    if block is not None:
        mask[..., 0] |= ~mask.any(dim=-1)
    return mask.unsqueeze(1)


def _block_masks(
    layout: PackedAttentionLayout, index: int, sliding_window: int | None, explicit: bool
) -> list[tuple[slice, slice, torch.Tensor | None]]:
    """The blocks of bucket ``index`` with their masks, built once per step (cached on the layout)."""
    bucket = layout.buckets[index]

    def build():
        needs_mask = sliding_window is not None or explicit
        blocks = query_blocks(bucket, sliding_window, needs_mask, layout.image_blocks)
        if len(blocks) == 1:
            return [(*blocks[0], bucket_mask(bucket, sliding_window, explicit, layout.image_blocks))]
        return [(q, k, bucket_mask(bucket, sliding_window, explicit, None, (q, k))) for q, k in blocks]

    return layout.cached(("explicit" if explicit else "sdpa", index, sliding_window), build)


def packed_sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PackedAttentionLayout,
    scaling: float | None,
    dropout: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention of packed rows. query ``[R, H, T, D]``, key/value ``[R, Hkv, T, D]`` -> ``[R, T, H, D]``."""
    rows, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(0, 1).reshape(heads, rows * length, head_dim)
    k = key.transpose(0, 1).reshape(kv_heads, rows * length, head_dim)
    v = value.transpose(0, 1).reshape(kv_heads, rows * length, value.shape[-1])
    out = q.new_zeros(heads, rows * length, value.shape[-1])
    for index, bucket in enumerate(layout.buckets):
        q_g = q[:, bucket["query_index"]].transpose(0, 1)  # [G, H, Lq, D]
        k_g = k[:, bucket["key_index"]].transpose(0, 1)
        v_g = v[:, bucket["key_index"]].transpose(0, 1)
        o_g = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q_g[:, :, queries],
                    k_g[:, :, keys],
                    v_g[:, :, keys],
                    attn_mask=mask,
                    dropout_p=dropout,
                    is_causal=mask is None,
                    scale=scaling,
                    enable_gqa=heads != kv_heads,
                )
                for queries, keys, mask in _block_masks(layout, index, sliding_window, explicit=False)
            ],
            dim=2,
        )
        o_flat = o_g.transpose(0, 1).reshape(heads, -1, o_g.shape[-1])[:, bucket["query_slots"]]
        out = out.index_copy(1, bucket["query_targets"], o_flat)
    return out.reshape(heads, rows, length, -1).permute(1, 2, 0, 3)


def packed_explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PackedAttentionLayout,
    scaling: float | None,
    dropout: float,
    sliding_window: int | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """`packed_sdpa_attention` with the softmax written out: scores soft-capped (``softcap * tanh(s / softcap)``)
    and/or a per-head sink logit appended to every row and dropped after the softmax, as the models' eager code
    does. Same groups and masks, so the cost stays block-sparse."""
    rows, heads, length, head_dim = query.shape
    groups = heads // key.shape[1]
    scale = head_dim**-0.5 if scaling is None else scaling
    q = query.transpose(0, 1).reshape(heads, rows * length, head_dim)
    k = key.repeat_interleave(groups, dim=1).transpose(0, 1).reshape(heads, rows * length, head_dim)
    v = value.repeat_interleave(groups, dim=1).transpose(0, 1).reshape(heads, rows * length, value.shape[-1])
    out = q.new_zeros(heads, rows * length, value.shape[-1])
    for index, bucket in enumerate(layout.buckets):
        q_g = q[:, bucket["query_index"]].transpose(0, 1)  # [G, H, Lq, D]
        k_g = k[:, bucket["key_index"]].transpose(0, 1)
        v_g = v[:, bucket["key_index"]].transpose(0, 1)
        blocks = _block_masks(layout, index, sliding_window, explicit=True)
        o_g = torch.cat(
            [
                _explicit_block(q_g[:, :, qs], k_g[:, :, ks], v_g[:, :, ks], mask, scale, dropout, softcap, sinks)
                for qs, ks, mask in blocks
            ],
            dim=2,
        )
        o_flat = o_g.transpose(0, 1).reshape(heads, -1, o_g.shape[-1])[:, bucket["query_slots"]]
        out = out.index_copy(1, bucket["query_targets"], o_flat)
    return out.reshape(heads, rows, length, -1).permute(1, 2, 0, 3)


def _explicit_block(q_g, k_g, v_g, mask, scale: float, dropout: float, softcap: float | None, sinks) -> torch.Tensor:
    """One block of `packed_explicit_attention`: scores, soft-cap, mask, softmax with the sink logit, values."""
    heads = q_g.shape[1]
    scores = torch.matmul(q_g, k_g.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, heads, 1, 1).expand(scores.shape[0], heads, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=softmax_dtype(scores))[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype(scores))
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs.to(v_g.dtype), v_g)

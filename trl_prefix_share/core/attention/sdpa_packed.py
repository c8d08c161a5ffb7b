"""CPU kernel: the packed attention decomposed into per-group SDPA calls.

Each group is one block of the block-sparse mask: a document's shared prefix plus its first branch (plain causal),
or a later branch's queries over [shared prefix, own branch]. Groups are padded into one batched SDPA call per bucket,
so no attention is computed across documents or branches, and no Python runs per token.

Layers whose softmax is not SDPA's (logit soft-capping, Gemma 2; attention sinks, GPT-OSS: one extra logit per head
in every softmax row) take the same groups through explicit scores instead (`packed_explicit_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trl_prefix_share.core.attention.dense_explicit import softmax_dtype
from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout


def bucket_mask(
    bucket: dict[str, torch.Tensor],
    sliding_window: int | None,
    explicit: bool = False,
    image_blocks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean ``[G, 1, Lq, Lk]`` mask of a bucket, or ``None`` where plain causal attention is exact.

    A key's slot equals its position, so query q sees key slot k iff ``k <= query_pos[q]`` (and, in a sliding-window
    layer, ``query_pos[q] - k < window``: distance in positions, not packed indices). With ``image_blocks`` (Gemma 3)
    a query inside an image also sees the later keys of the same image, as stock's mask does (causal OR same image,
    then the window). Built once per step per bucket and window size, then shared by every layer and by the policy
    and reference forwards.
    """
    if bucket["trunk"] and sliding_window is None and not explicit and image_blocks is None:
        return None
    query_pos = bucket["query_pos"][:, :, None]
    key_slot = torch.arange(bucket["key_index"].size(1), device=query_pos.device)[None, None, :]
    mask = key_slot <= query_pos
    if image_blocks is not None:
        flat = image_blocks.reshape(-1)
        query_block = flat[bucket["query_index"]][:, :, None]
        key_block = flat[bucket["key_index"]][:, None, :]
        mask |= (query_block == key_block) & (query_block >= 0) & bucket["key_valid"][:, None, :]
    if sliding_window is not None:
        mask &= query_pos - key_slot < sliding_window
    return mask.unsqueeze(1)


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
        mask = layout.cached(
            ("sdpa", index, sliding_window),
            lambda b=bucket: bucket_mask(b, sliding_window, image_blocks=layout.image_blocks),
        )
        q_g = q[:, bucket["query_index"]].transpose(0, 1)  # [G, H, Lq, D]
        k_g = k[:, bucket["key_index"]].transpose(0, 1)
        v_g = v[:, bucket["key_index"]].transpose(0, 1)
        o_g = F.scaled_dot_product_attention(
            q_g,
            k_g,
            v_g,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=heads != kv_heads,
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
        mask = layout.cached(
            ("explicit", index, sliding_window),
            lambda b=bucket: bucket_mask(b, sliding_window, explicit=True, image_blocks=layout.image_blocks),
        )
        q_g = q[:, bucket["query_index"]].transpose(0, 1)  # [G, H, Lq, D]
        k_g = k[:, bucket["key_index"]].transpose(0, 1)
        v_g = v[:, bucket["key_index"]].transpose(0, 1)
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
        o_g = torch.matmul(probs.to(v_g.dtype), v_g)
        o_flat = o_g.transpose(0, 1).reshape(heads, -1, o_g.shape[-1])[:, bucket["query_slots"]]
        out = out.index_copy(1, bucket["query_targets"], o_flat)
    return out.reshape(heads, rows, length, -1).permute(1, 2, 0, 3)

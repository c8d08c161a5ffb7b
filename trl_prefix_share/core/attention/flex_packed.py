"""CUDA kernel: FlexAttention with a BlockMask built from the packed layout.

The block mask is built once per step per sliding-window size and shared by all layers and by the policy and
reference forwards, from per-block summaries of the layout (``block_sparsity``: no dense ``[T, T]`` mask).
``flex_attention`` is compiled once with dynamic shapes, so new row lengths do not recompile (with
``dynamic=False`` it recompiles per length and silently falls back to eager after the cache limit).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from trl_prefix_share.core.attention.block_sparsity import layout_block_mask
from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def build_block_mask(layout: PackedAttentionLayout, sliding_window: int | None, device: torch.device):
    """BlockMask of the packed rule: key not after the query and the query inside the key's subtree (its tree node
    or a descendant's), or (Gemma 3) key in the query's image."""
    from torch.nn.attention.flex_attention import create_block_mask

    span = layout.span_ends.to(device)
    pos = layout.position_ids.to(device)
    rows, length = span.shape
    # The query's own index, read from a tensor: torch 2.13's Inductor CPU template for FlexAttention generates C++
    # that does not compile when a loaded value is compared with the query index itself.
    column = torch.arange(length, device=device).expand(rows, length)

    def mask_mod(b, h, q_idx, kv_idx):
        # The query lies inside the key's subtree (same tree, key an ancestor's or its own node's token) and not
        # before it; row padding (span -1) is nobody's key.
        end = span[b, kv_idx]
        real = (kv_idx <= q_idx) & (end > column[b, q_idx])
        if sliding_window is not None:
            real = real & (pos[b, q_idx] - pos[b, kv_idx] < sliding_window)
        # Row padding attends to itself only, so no row of the softmax is empty.
        return real | ((end < 0) & (q_idx == kv_idx))

    if layout.image_blocks is not None:
        blocks = layout.image_blocks.to(device)
        causal_mask_mod = mask_mod

        def mask_mod(b, h, q_idx, kv_idx):  # Gemma 3: also bidirectional inside an image (one segment's run)
            same_image = (blocks[b, q_idx] == blocks[b, kv_idx]) & (blocks[b, q_idx] >= 0)
            if sliding_window is not None:
                same_image = same_image & (pos[b, q_idx] - pos[b, kv_idx] < sliding_window)
            return causal_mask_mod(b, h, q_idx, kv_idx) | same_image

        # Inside an image keys may follow their query: the per-block causal rule does not hold. Image prompts are
        # short next to the long text prompts the block summaries are for, so the dense construction serves them.
        return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=device)
    return layout_block_mask(span, pos, sliding_window, mask_mod)


def packed_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PackedAttentionLayout,
    scaling: float | None,
    sliding_window: int | None,
    compiled: bool = True,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed rows. query ``[R, H, T, D]``, key/value ``[R, Hkv, T, D]`` -> ``[R, T, H, D]``.

    Soft-capping is a ``score_mod``. Sinks add one logit per head to every softmax row: with the row's log-sum-exp
    ``lse`` over the real keys, the output with the sink is ``out * sigmoid(lse - sink)``."""
    block_mask = layout.cached(
        ("flex", sliding_window, query.device), lambda: build_block_mask(layout, sliding_window, query.device)
    )
    if compiled:
        attend = _compiled_flex_attention()
    else:
        from torch.nn.attention.flex_attention import flex_attention as attend
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap

    result = attend(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        return_lse=sinks is not None,
    )
    if sinks is not None:
        out, lse = result
        out = out * torch.sigmoid(lse - sinks.to(lse.dtype)[None, :, None]).unsqueeze(-1).to(out.dtype)
    else:
        out = result
    return out.transpose(1, 2).contiguous()

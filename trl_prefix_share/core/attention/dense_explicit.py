"""Plain (unpacked) attention with the softmax written out, for layers SDPA cannot run: logit soft-capping and
attention sinks. A switched model runs its ordinary batches and `generate` here, with the mask transformers built."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_dtype(scores: torch.Tensor) -> torch.dtype:
    """Half-precision scores take their softmax in float32, as the models' eager code does; wider stay as they are."""
    return torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype


def dense_explicit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """query ``[B, H, Q, D]``, key/value ``[B, Hkv, K, D]`` -> ``[B, Q, H, D]``, as the models' eager code computes it.

    ``attention_mask`` is what our mask function (transformers' SDPA mask) returns: boolean (True = visible),
    additive, or None for plain causal attention (lower-right aligned when a cache makes K > Q)."""
    heads, head_dim = query.shape[1], query.shape[-1]
    groups = heads // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (head_dim**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    hidden = torch.finfo(scores.dtype).min  # not -inf: a fully masked (padding) row stays finite, as in eager code
    if attention_mask is None:
        q_len, k_len = scores.shape[-2:]
        if q_len > 1 and getattr(module, "is_causal", True):
            rows = torch.arange(q_len, device=scores.device)[:, None] + (k_len - q_len)
            scores = scores.masked_fill(torch.arange(k_len, device=scores.device)[None, :] > rows, hidden)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., : scores.shape[-1]], hidden)
    else:
        scores = scores + attention_mask[..., : scores.shape[-1]]
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, heads, 1, 1).expand(scores.shape[0], heads, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=softmax_dtype(scores))[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype(scores))
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()

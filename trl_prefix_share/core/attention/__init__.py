"""The ``prefix_share`` attention implementation registered with transformers.

Given a packed layout (passed by our forward as the ``prefix_share_layout`` keyword, which transformers hands to the
attention function of every layer), it computes the block-sparse shared-prefix attention. Without one it is plain
SDPA with transformers' SDPA mask, so ordinary padded batches and ``generate`` keep working on a switched model.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from trl_prefix_share.core.attention.dense_explicit import dense_explicit_attention
from trl_prefix_share.core.attention.flex_packed import packed_flex_attention
from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout, layout_for_batch
from trl_prefix_share.core.attention.sdpa_packed import packed_explicit_attention, packed_sdpa_attention
from trl_prefix_share.core.attention.windows import layer_window

ATTENTION_NAME = "prefix_share"
KERNELS = ("auto", "sdpa", "flex", "flex_eager")

_packed_forward_active: ContextVar[bool] = ContextVar("prefix_share_packed_forward", default=False)


@contextlib.contextmanager
def packed_forward_scope():
    """While active, the mask function builds no mask: the packed layout carries the structure instead."""
    token = _packed_forward_active.set(True)
    try:
        yield
    finally:
        _packed_forward_active.reset(token)


def is_packed_forward_active() -> bool:
    """Whether a packed forward is running (layers that get no layout then must refuse to run)."""
    return _packed_forward_active.get()


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """``auto`` -> FlexAttention on CUDA, the SDPA decomposition elsewhere (FlexAttention has no CPU backward)."""
    if kernel not in KERNELS:
        raise ValueError(f"Unknown prefix-sharing attention kernel {kernel!r}; choose one of {KERNELS}.")
    if kernel == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return kernel


def prefix_share_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    layout: PackedAttentionLayout | None = kwargs.pop("prefix_share_layout", None)
    if layout is None and (kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None):
        # SDPA has no soft-capping or sinks: write the softmax out, as the model's eager attention does.
        out = dense_explicit_attention(
            module, query, key, value, attention_mask, dropout, scaling, kwargs.get("softcap"), kwargs.get("s_aux")
        )
        return out, None
    if layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not None:
        # Our mask function builds no mask during a packed forward, so a mask here was made or changed by the layer
        # itself (e.g. Doge's learned dynamic mask, an additive bias): the packed kernels would silently drop it.
        raise NotImplementedError(
            f"{type(module).__name__} passes its own attention mask or bias to the attention function, which the "
            "packed layout would replace."
        )
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if sinks is None and isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise NotImplementedError(f"{type(module).__name__} has attention sinks but did not pass them as `s_aux`.")
    if softcap is None and getattr(module, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(f"{type(module).__name__} soft-caps its logits but did not pass `softcap`.")
    layout.layer_calls += 1
    # Some models (Qwen2-MoE, PhiMoE) apply their window only through the mask, which a packed forward does not
    # build: the window comes from the layer (stamped at installation from the config), never from the keyword alone.
    sliding_window = layer_window(module, sliding_window)
    if layout.kernel == "sdpa" and (softcap is not None or sinks is not None):
        out = packed_explicit_attention(query, key, value, layout, scaling, dropout, sliding_window, softcap, sinks)
    elif layout.kernel == "sdpa":
        out = packed_sdpa_attention(query, key, value, layout, scaling, dropout, sliding_window)
    else:
        if dropout:
            raise NotImplementedError(
                "FlexAttention has no attention dropout; set the model's `attention_dropout` to 0 or use "
                "`prefix_share_attention='sdpa'`."
            )
        out = packed_flex_attention(
            query,
            key,
            value,
            layout,
            scaling,
            sliding_window,
            compiled=layout.kernel == "flex",
            softcap=softcap,
            sinks=sinks,
        )
    return out, None


def prefix_share_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """SDPA's mask for ordinary batches; none during a packed forward (the layout defines the mask there)."""
    if _packed_forward_active.get():
        return None
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register the implementation and its mask function under ``ATTENTION_NAME`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, prefix_share_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, prefix_share_mask)


__all__ = [
    "ATTENTION_NAME",
    "KERNELS",
    "PackedAttentionLayout",
    "is_packed_forward_active",
    "layout_for_batch",
    "packed_forward_scope",
    "register_attention",
    "resolve_kernel",
]

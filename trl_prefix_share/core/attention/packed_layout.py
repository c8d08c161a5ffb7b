"""The per-forward view of a packed batch that the attention function reads.

Built once per step from the collator's tensors and shared by every layer and by the policy and reference forwards
(looked up by the identity of the batch tensor). Derived masks (sliding-window variants, FlexAttention block masks)
are built lazily once and cached here.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class PackedAttentionLayout:
    """Tree (document), node (branch), subtree-end and position structure of packed rows, plus lazily built and
    cached masks."""

    def __init__(self, packed: dict[str, Any], kernel: str) -> None:
        self.kernel = kernel
        self.document_ids: torch.Tensor = packed["document_ids"]
        self.branch_ids: torch.Tensor = packed["branch_ids"]
        # Row-local end of each token's subtree (-1 on padding): key k is visible from query q iff k <= q < end[k].
        self.span_ends: torch.Tensor = packed["span_ends"]
        self.position_ids: torch.Tensor = packed["position_ids"]
        self.buckets: list[dict[str, torch.Tensor]] = packed.get("attention_buckets") or []
        # Runs of image tokens attended bidirectionally (Gemma 3), ``[rows, T]`` run ids, -1 elsewhere; set by the
        # vision forward before the first layer runs (see ``vision/forward.py``).
        self.image_blocks: torch.Tensor | None = None
        self.layer_calls = 0
        self.mixer_calls = 0
        self._cache: dict[Any, Any] = {}

    def cached(self, key: Any, build):
        """Return ``self._cache[key]``, building it with ``build()`` the first time (once per step)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


_last: tuple[weakref.ref, PackedAttentionLayout] | None = None


def layout_for_batch(packed: dict[str, Any], kernel: str) -> PackedAttentionLayout:
    """The layout of this batch, reused while the same batch tensor is alive (policy, then reference forward)."""
    global _last
    anchor = packed["input_ids"]
    if _last is not None and _last[0]() is anchor and _last[1].kernel == kernel:
        layout = _last[1]
    else:
        layout = PackedAttentionLayout(packed, kernel)
        _last = (weakref.ref(anchor), layout)
    layout.layer_calls = 0
    layout.mixer_calls = 0
    return layout

"""The packing choice: how one trainer lays its batches out, and which attention kernel reads the layout.

One object carries it to both sides, so they cannot disagree: the collators read the layout fields (and whether to
build the index tensors of the per-group SDPA decomposition), the model side reads ``kernel``. Resolved once per
trainer from its config and device (``options.packing_options``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl_prefix_share.core.layout.tree import MIN_SHARED_TOKENS

#: Batch key under which the collators hand the packed layout to the model's forward.
PACKED_KEY = "prefix_share"


@dataclass
class PackingOptions:
    """How documents are packed and which attention kernel runs them.

    Attributes:
        share_prefix: lay a shared prompt out once (``False``: every sequence its own document, an ablation).
        max_row_tokens: token budget of one packed row (``None``: the whole batch in one row).
        pad_to_multiple_of: pad the row length to a multiple of this (bounds recompiles of compiled kernels).
        sdpa_buckets: build the index tensors of the per-group SDPA decomposition (the CPU kernel). ``None``: exactly
            when ``kernel`` is ``"sdpa"``; ``False`` suits layouts no SDPA kernel reads (token estimates).
        pack_documents: several documents per row (``False``: one per row, padded to the longest; an ablation).
        kernel: the attention kernel that reads the layout (``sdpa``, ``flex`` or ``flex_eager``).
        prefix_tree: merge the documents of a row into prefix trees (prompts share what they have in common, not
            only identical prompts); resolved per model by the trainer (``core/tree_support.py``).
        shift_positions: trees may merge sequences that start at different position ids (left-padded online-RL
            prompts): set only for models that see positions through their differences alone.
        prefix_tree_min_shared_tokens: the fewest tokens a tree node shared by different prompts holds.
    """

    share_prefix: bool = True
    max_row_tokens: int | None = None
    pad_to_multiple_of: int | None = None
    sdpa_buckets: bool | None = None
    pack_documents: bool = True
    kernel: str = "sdpa"
    prefix_tree: bool = True
    shift_positions: bool = False
    prefix_tree_min_shared_tokens: int = MIN_SHARED_TOKENS

    def __post_init__(self) -> None:
        if self.sdpa_buckets is None:
            self.sdpa_buckets = self.kernel == "sdpa"

    def layout_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``layout.pack_documents`` these options set."""
        return {
            "max_row_tokens": self.max_row_tokens,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "sdpa_buckets": self.sdpa_buckets,
            "pack": self.pack_documents,
            "prefix_tree": self.share_prefix and self.prefix_tree,
            "shift_positions": self.shift_positions,
            "min_shared_tokens": self.prefix_tree_min_shared_tokens,
        }

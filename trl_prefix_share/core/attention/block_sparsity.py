"""FlexAttention's block mask read from the layout, never from a dense ``[T, T]`` mask.

``create_block_mask`` (uncompiled, torch 2.13) evaluates the ``mask_mod`` on every (query, key) pair, a dense
``[rows, T, T]`` tensor (and int64 gathers of that size inside the ``mask_mod``): 16k-token rows cost gigabytes
before attention starts. Here each block of ``block_size`` queries x ``block_size`` keys is classified from per-block
summaries of the layout, so the work and memory are ``(T / block_size)^2``. The packed rule is one interval test:
key ``k`` is visible from query ``q`` iff ``k <= q < span_end[k]`` (the query lies in the subtree of the key's tree
node; trees are laid out depth first, so every subtree is one run of the row), plus the sliding window on positions:

- *possibly visible* (the kernel runs the block, applying the ``mask_mod`` to each pair) unless some rule rules out
  every pair: the block has no real key, every key after every query, every query at or past every key's subtree
  end, or every pair farther apart than the sliding window; a diagonal block holding row padding stays in (padding
  attends to itself);
- *full* (the kernel runs it without the ``mask_mod``) only when every pair is visible: no padding on either side,
  every key before every query, every query before the smallest subtree end of the keys, and every pair inside the
  window.

The summaries only ever widen what may be visible, so an empty block is truly empty and a full block truly full:
the result is exact (``mask_mod`` decides inside every partial block), at most a few partial blocks more than the
dense construction finds where a block straddles two nodes or trees.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: FlexAttention's default block size (queries and keys), the granularity of its sparsity.
BLOCK_SIZE = 128
_BIG = torch.iinfo(torch.int64).max // 4


def _block_view(values: torch.Tensor, block_size: int, fill: int) -> torch.Tensor:
    """``[rows, T]`` -> ``[rows, blocks, block_size]``, the tail padded with ``fill``."""
    rows, length = values.shape
    blocks = -(-length // block_size)
    padded = values.new_full((rows, blocks * block_size), fill)
    padded[:, :length] = values
    return padded.view(rows, blocks, block_size)


def _masked_range(values: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: min and max of ``values`` over the real tokens (``_BIG`` / ``-_BIG`` for a block with none)."""
    low = torch.where(real, values, _BIG).amin(dim=-1)
    high = torch.where(real, values, -_BIG).amax(dim=-1)
    return low, high


def block_visibility(
    span_ends: torch.Tensor,
    position_ids: torch.Tensor,
    sliding_window: int | None,
    block_size: int = BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(possible, full)``: ``[rows, query blocks, key blocks]`` booleans of the packed attention rule (see the
    module docstring); ``full`` implies ``possible``. ``span_ends``: ``[rows, T]``, -1 on row padding."""
    length = span_ends.size(1)
    span = _block_view(span_ends.long(), block_size, -1)
    pos = _block_view(position_ids.long(), block_size, 0)
    index = _block_view(torch.arange(length, device=span.device).expand_as(span_ends), block_size, -1)
    real = span >= 0
    in_row = index >= 0
    has_pad = (~real & in_row).any(dim=-1)
    span_low, span_high = _masked_range(span, real)
    pos_low, pos_high = _masked_range(pos, real)
    has_real = real.any(dim=-1)
    first = torch.arange(span.size(1), device=span.device) * block_size  # first index of each block
    last = torch.clamp(first + block_size - 1, max=length - 1)

    def q(t: torch.Tensor) -> torch.Tensor:  # per query block, broadcast over key blocks
        return t[:, :, None]

    def k(t: torch.Tensor) -> torch.Tensor:  # per key block, broadcast over query blocks
        return t[:, None, :]

    causal = first[None, None, :] <= last[None, :, None]
    inside = first[None, :, None] < k(span_high)  # some query before some key's subtree end
    possible = q(has_real) & k(has_real) & causal & inside
    if sliding_window is not None:
        possible &= q(pos_low) - k(pos_high) < sliding_window
    diagonal = torch.eye(span.size(1), dtype=torch.bool, device=span.device)[None]
    possible |= diagonal & q(has_pad)

    whole = in_row.all(dim=-1) & ~has_pad  # every slot a real token of the row
    full = q(whole) & k(whole)
    full &= first[None, None, :] + block_size <= first[None, :, None]  # every key block before the query block
    full &= last[None, :, None] < k(span_low)  # every query inside every key's subtree
    if sliding_window is not None:
        full &= q(pos_high) - k(pos_low) < sliding_window
    return possible, full & possible


def _kv_blocks(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, nq, nk]`` booleans -> FlexAttention's ``(num_blocks [rows, 1, nq], indices [rows, 1, nq, nk])``:
    the selected key blocks of each query block first, in order."""
    counts = selected.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def layout_block_mask(
    span_ends: torch.Tensor,
    position_ids: torch.Tensor,
    sliding_window: int | None,
    mask_mod: Callable,
    block_size: int = BLOCK_SIZE,
):
    """The ``BlockMask`` of the packed rule from the layout's per-block summaries (no dense mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    possible, full = block_visibility(span_ends, position_ids, sliding_window, block_size)
    partial_counts, partial_indices = _kv_blocks(possible & ~full)
    full_counts, full_indices = _kv_blocks(full)
    length = span_ends.size(1)
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )

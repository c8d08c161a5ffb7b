"""The token metrics every prefix-shared trainer logs: tokens run vs tokens stock TRL's padded batch would run."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from trl_prefix_share.core.packing import PACKED_KEY


def log_token_counts(trainer: Any, packed_tokens: int, stock_tokens: int) -> None:
    """Append `prefix_share/tokens`, `prefix_share/stock_tokens` and `prefix_share/token_ratio` to the trainer's
    metrics (summed over processes), and keep running training totals in `trainer.prefix_share_totals`.

    Counts come from tensor shapes, so no device sync happens on one process. Several processes are summed with
    `gather`, not `gather_for_metrics`: on a dataloader's last, uneven batch the latter keeps only the first
    `remainder` rows, which here are processes (not examples), and would drop the counts of the higher ranks."""
    mode = "train" if trainer.model.training else "eval"
    if trainer.accelerator.num_processes > 1:
        counts = torch.tensor([[packed_tokens, stock_tokens]], device=trainer.accelerator.device)
        packed_tokens, stock_tokens = trainer.accelerator.gather(counts).sum(0).tolist()
    if mode == "train":
        totals = trainer.__dict__.setdefault("prefix_share_totals", {"tokens": 0, "stock_tokens": 0})
        totals["tokens"] += packed_tokens
        totals["stock_tokens"] += stock_tokens
    metrics = trainer._metrics.setdefault(mode, defaultdict(list))
    metrics["prefix_share/tokens"].append(packed_tokens)
    metrics["prefix_share/stock_tokens"].append(stock_tokens)
    metrics["prefix_share/token_ratio"].append(stock_tokens / max(packed_tokens, 1))


def log_batch_token_counts(trainer: Any, inputs: dict[str, Any]) -> None:
    """`log_token_counts` for a stock padded batch (``input_ids``) that may carry a packed layout; in the exact
    fallback (no layout) both counts are the padded batch's, so the ratio is 1.0."""
    stock = inputs["input_ids"].numel()
    if PACKED_KEY in inputs:
        log_token_counts(trainer, inputs[PACKED_KEY]["input_ids"].numel(), stock)
    elif getattr(trainer, "prefix_share_fallback", None) is not None:
        log_token_counts(trainer, stock, stock)

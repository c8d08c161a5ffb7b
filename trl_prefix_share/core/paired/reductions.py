"""Reductions in the virtual shifted layout: from per-token log-probs to what ORPO's / CPO's forward returns.

The packed forward (``packed_forward.py``) returns per-token log-probs in the stacked batch's shifted layout; these
turn them into per-sequence sums or averages over completion tokens and the NLL term, on which TRL's
``odds_ratio_loss`` / ``cpo_loss`` and metric code run unchanged.
"""

from __future__ import annotations

import torch

from trl_prefix_share.core.layout import IGNORE_INDEX


def completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[N, L-1]`` mask of the positions that predict a completion token (labels shifted by one, as TRL does)."""
    return labels[:, 1:] != IGNORE_INDEX


def sequence_log_probs(log_probs: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Per-sequence sum of the masked per-token log-probs, or their mean over the sequence's masked tokens."""
    total = (log_probs * mask).sum(dim=-1)
    return total / mask.sum(dim=-1) if average else total


def mean_nll(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean negative log-likelihood over all masked positions (a mean-reduced cross-entropy)."""
    return -(log_probs * mask).sum() / mask.sum()


def scored_mean_logits(mean_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-D: the vocabulary-mean logit of every masked position; its ``.mean()`` is the mean logit over them."""
    return mean_logits[mask]

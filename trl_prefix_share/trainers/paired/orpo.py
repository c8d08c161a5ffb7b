"""``PrefixSharedORPOTrainer``: ``trl.experimental.orpo.ORPOTrainer`` with each prompt run once for both responses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from trl_prefix_share.core.options import PrefixShareArguments
from trl_prefix_share.core.paired.reductions import mean_nll
from trl_prefix_share.trainers.paired.mixin import PrefixSharedPairedMixin


@dataclass
class PrefixSharedORPOConfig(ORPOConfig, PrefixShareArguments):
    """Configuration of [`PrefixSharedORPOTrainer`]: every `ORPOConfig` field plus [`PrefixShareArguments`]."""


class PrefixSharedORPOTrainer(PrefixSharedPairedMixin, ORPOTrainer):
    """Drop-in replacement for `trl.experimental.orpo.ORPOTrainer`: same constructor, same config (`ORPOConfig` or
    [`PrefixSharedORPOConfig`] for the extra knobs), same tokenization, truncation, loss, gradients and metrics,
    except `logits/chosen` and `logits/rejected` (see `concatenated_forward`); fewer tokens processed.

    ORPO's NLL term is a cross-entropy over prompt *and* chosen tokens. The chosen sequence is scored from its second
    token on, so the prompt, laid out once, is scored once, for the chosen sequence; the rejected sequence is scored
    on its completion only, as in stock.

    Extra metrics: `prefix_share/tokens` (tokens in the packed rows of a step), `prefix_share/stock_tokens` (tokens
    of the stock stacked batch) and `prefix_share/token_ratio`. Examples whose response truncation leaves empty (a NaN
    loss in stock) raise an error naming them, or are dropped with `drop_invalid_examples=True`.
    """

    _tag_names = ["trl", "orpo", "prefix-share"]
    score_chosen_prompt = True

    def _average_log_prob(self) -> bool:
        return True

    def _chosen_nll(self, log_probs: torch.Tensor, label_mask: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        return mean_nll(log_probs, label_mask)

    def _concatenation_padding_value(self) -> int:
        return self.padding_value

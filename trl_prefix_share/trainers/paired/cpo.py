"""``PrefixSharedCPOTrainer``: ``trl.experimental.cpo.CPOTrainer`` (CPO, SimPO, AlphaPO) with each prompt run once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.experimental.cpo import CPOConfig, CPOTrainer

from trl_prefix_share.core.options import PrefixShareArguments
from trl_prefix_share.core.paired.reductions import mean_nll
from trl_prefix_share.trainers.paired.mixin import PrefixSharedPairedMixin

#: Loss types for which CPOTrainer averages the log-probs over completion tokens (length-normalised rewards).
AVERAGED_LOSS_TYPES = ("ipo", "simpo")


@dataclass
class PrefixSharedCPOConfig(CPOConfig, PrefixShareArguments):
    """Configuration of [`PrefixSharedCPOTrainer`]: every `CPOConfig` field plus [`PrefixShareArguments`]."""


class PrefixSharedCPOTrainer(PrefixSharedPairedMixin, CPOTrainer):
    """Drop-in replacement for `trl.experimental.cpo.CPOTrainer`: same constructor, same config (`CPOConfig` or
    [`PrefixSharedCPOConfig`]), every `loss_type` (sigmoid, hinge, ipo, simpo, alphapo) with `cpo_alpha`,
    `simpo_gamma`, `label_smoothing` and `alpha`; same loss, gradients and metrics except `logits/chosen` and
    `logits/rejected` (see `concatenated_forward`); fewer tokens processed.

    CPO's NLL (behaviour-cloning) term is a cross-entropy over the chosen *completion* tokens only, so no prompt token
    is scored. `loss_type`, `cpo_alpha` and the other loss knobs are read from the trainer at every step, as stock does.
    """

    _tag_names = ["trl", "cpo", "prefix-share"]
    score_chosen_prompt = False

    def _average_log_prob(self) -> bool:
        return self.loss_type in AVERAGED_LOSS_TYPES

    def _chosen_nll(self, log_probs: torch.Tensor, label_mask: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        if self.cpo_alpha == 0:  # stock skips the term: a constant zero, no gradient
            return torch.tensor(0.0, device=self.accelerator.device)
        return mean_nll(log_probs, completion)

    def _concatenation_padding_value(self) -> int:
        return self.pad_token_id

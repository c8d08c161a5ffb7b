"""``PrefixSharedGRPOTrainer``: ``trl.GRPOTrainer`` with each prompt run once for its ``num_generations`` completions.

Generation, rewards, advantages and every loss type are TRL's. Only the per-token log-prob pass changes (see
``scoring.py``): the policy forward, the old-policy pass and the reference pass each run a prompt once per group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_prefix_share.trainers.online.scoring import PrefixSharedScoringMixin

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import BitsAndBytesConfig


class PrefixSharedGRPOTrainer(PrefixSharedScoringMixin, GRPOTrainer):
    """Drop-in replacement for [`~trl.GRPOTrainer`]: same constructor, same config ([`~trl.GRPOConfig`] or
    [`PrefixSharedGRPOConfig`]), same losses, gradients and metrics; each prompt's tokens run once per group.

    Extra metrics: `prefix_share/tokens`, `prefix_share/stock_tokens` and `prefix_share/token_ratio` of the policy
    forward of each micro-batch (the ratio shows how many completions of a prompt shared a micro-batch).
    """

    _tag_names = ["trl", "grpo", "prefix-share"]

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
        tools: list[Callable] | None = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
    ) -> None:
        self._start_prefix_share(args, peft_config)
        super().__init__(
            model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        self._install_prefix_sharing()

"""``PrefixSharedRLOOTrainer``: ``trl.RLOOTrainer`` with each prompt run once for its ``num_generations`` completions.

As for GRPO, only the per-token log-prob pass changes (``scoring.py``); the leave-one-out baseline, the loss and the
metrics are TRL's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from trl import RLOOConfig, RLOOTrainer

from trl_prefix_share.trainers.online.scoring import PrefixSharedScoringMixin

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import BitsAndBytesConfig


class PrefixSharedRLOOTrainer(PrefixSharedScoringMixin, RLOOTrainer):
    """Drop-in replacement for [`~trl.RLOOTrainer`]: same constructor, same config ([`~trl.RLOOConfig`] or
    [`PrefixSharedRLOOConfig`]), same losses, gradients and metrics, plus the `prefix_share/*` token metrics."""

    _tag_names = ["trl", "rloo", "prefix-share"]

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        reward_funcs: Any,
        args: RLOOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
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
        )
        self._install_prefix_sharing()

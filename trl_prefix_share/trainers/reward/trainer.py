"""``PrefixSharedRewardTrainer``: ``trl.RewardTrainer`` with each prompt run once for all its responses.

Nothing of TRL's loss code is replaced. The collator adds a packed layout to TRL's own padded reward batch, and the
model's forward (wrapped once) runs the packed rows and returns one score per stock row, read at exactly the token
stock TRL reads it at. ``margin``, ``center_rewards_coefficient``, PEFT, evaluation and every metric are TRL's.

Besides TRL's pairwise data, the trainer accepts ranked lists of K responses per prompt (see ``ranked.py``), trained
on all their ordered pairs with the prompt run once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset, IterableDataset
from transformers import DataCollator, EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import RewardConfig, RewardTrainer
from trl.data_utils import get_dataset_column_names

from trl_prefix_share.core.reward.collator import PrefixSharedRewardCollator
from trl_prefix_share.core.reward.scores import enable_packed_scores, verify_packed_scores
from trl_prefix_share.core.vision.image_inputs import has_image_column
from trl_prefix_share.trainers.reward.ranked import (
    RANKED_COLUMNS,
    DataCollatorForRankedPreference,
    is_ranked_dataset,
    prepare_ranked_dataset,
)
from trl_prefix_share.trainers.reward.validation import validate_reward_dataset
from trl_prefix_share.trainers.wiring import PrefixSharingMixin, Switch

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import BitsAndBytesConfig


def refuse_images(*datasets: Any) -> None:
    """TRL 1.16's ``RewardTrainer`` tokenizes the text alone: an image column would be dropped without a word."""
    for dataset in datasets:
        parts = dataset.values() if isinstance(dataset, dict) else [dataset]
        for part in parts:
            if part is not None and has_image_column(get_dataset_column_names(part)):
                raise ValueError(
                    "The reward dataset has an image column, but TRL 1.16's `RewardTrainer` takes no images: stock "
                    "TRL would train on the text alone and drop the images silently. Train image preferences with "
                    "`PrefixSharedDPOTrainer`, or remove the image column to train a text reward model."
                )


class PrefixSharedRewardTrainer(PrefixSharingMixin, RewardTrainer):
    """Drop-in replacement for [`~trl.RewardTrainer`]: same constructor, same config ([`~trl.RewardConfig`] or
    [`PrefixSharedRewardConfig`] for the extra knobs), same losses, gradients and metrics; fewer tokens processed.

    Datasets: TRL's preference formats (pairs), or ranked lists (``{"prompt", "responses": [best, ..., worst]}``,
    optional ``"ranks"``; see ``trl_prefix_share.trainers.reward.ranked``), trained on all ordered pairs in one
    document per prompt.

    Extra metrics: `prefix_share/tokens` (tokens in the packed rows of a step), `prefix_share/stock_tokens` (tokens
    of stock TRL's padded batch for the same pairs) and `prefix_share/token_ratio` (their ratio).
    """

    _tag_names = ["trl", "reward-trainer", "prefix-share"]

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: RewardConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
    ) -> None:
        self._start_prefix_share(args, peft_config)
        refuse_images(train_dataset, eval_dataset)
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._install_prefix_sharing()

    def _prefix_share_switch(self) -> Switch:
        return enable_packed_scores, verify_packed_scores

    def _wrap_collator(self, models: list[torch.nn.Module]) -> None:
        # The head reads scores by the model's pad id (RewardTrainer sets it to the tokenizer's).
        pad_token_id = models[0].config.get_text_config().pad_token_id
        self.data_collator = PrefixSharedRewardCollator(
            self.data_collator,
            pad_token_id=pad_token_id,
            options=self.prefix_share_packing,
            ranked_collator=DataCollatorForRankedPreference(
                self.processing_class.pad_token_id, pad_to_multiple_of=self.args.pad_to_multiple_of
            ),
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if is_ranked_dataset(get_dataset_column_names(dataset)):
            dataset = prepare_ranked_dataset(
                dataset, processing_class, args.max_length, dataset_name, num_proc=args.dataset_num_proc
            )
        else:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return validate_reward_dataset(
            dataset,
            dataset_name,
            pad_token_id=processing_class.pad_token_id,
            max_row_tokens=self.prefix_share_args.max_row_tokens,
            drop_invalid=self.prefix_share_args.drop_invalid_examples,
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *RANKED_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._log_token_counts(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

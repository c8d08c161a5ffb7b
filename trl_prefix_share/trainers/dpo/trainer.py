"""``PrefixSharedDPOTrainer``: ``trl.DPOTrainer`` with each prompt run once for both responses.

Nothing of TRL's loss code is replaced. The collator adds a packed layout to TRL's own padded batch, and the model's
forward (wrapped once, on the policy and the reference) scores that layout and hands back per-token results in the
stock layout. Everything else (all loss types, reference handling, PEFT, precompute, metrics) is TRL's.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import Sampler
from transformers import (
    DataCollator,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
)
from trl import DPOConfig, DPOTrainer

from trl_prefix_share.core.model_support import (
    enable_prefix_sharing,
    enable_vision_prefix_sharing,
    verify_packed_forward,
)
from trl_prefix_share.core.preference.collator import PrefixSharedPreferenceCollator, pair_documents
from trl_prefix_share.core.vision.collator import PrefixSharedVisionPreferenceCollator
from trl_prefix_share.core.vision.model_kinds import vision_support
from trl_prefix_share.trainers.dpo.grouping import (
    GroupByPrompt,
    PromptGroupedSampler,
    prompt_grouped_sampler,
    vision_prompt_keys,
)
from trl_prefix_share.trainers.dpo.length_grouping import LengthGroupedBatchSampler, preference_lengths
from trl_prefix_share.trainers.dpo.token_budget import TokenBudgetBatchSampler, packed_tokens, pairs_in_batch
from trl_prefix_share.trainers.dpo.validation import check_not_emptied, validate_preference_dataset
from trl_prefix_share.trainers.wiring import PrefixSharingMixin, Switch

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import BitsAndBytesConfig

logger = logging.getLogger(__name__)


def _needs_reference_copy(model: Any, args: Any, peft_config: Any) -> bool:
    """A full fine-tune of an in-memory model that TRL could not reload by name for its reference."""
    if isinstance(model, str) or peft_config is not None or is_peft_model(model):
        return False
    if args is not None and args.precompute_ref_log_probs:
        return False
    return not getattr(model.config, "_name_or_path", "")


class PrefixSharedDPOTrainer(PrefixSharingMixin, DPOTrainer):
    """Drop-in replacement for [`~trl.DPOTrainer`]: same constructor, same config ([`~trl.DPOConfig`] or
    [`PrefixSharedDPOConfig`] for the extra knobs), same losses, gradients and metrics; fewer tokens processed.

    Extra metrics: `prefix_share/tokens` (tokens in the packed rows of a step), `prefix_share/stock_tokens` (tokens
    of stock TRL's padded batch for the same examples) and `prefix_share/token_ratio` (their ratio).
    """

    _tag_names = ["trl", "dpo", "prefix-share"]
    _always_group_by_prompt = False

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        ref_model: PreTrainedModel | None = None,
        args: DPOConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
    ) -> None:
        self._start_prefix_share(args, peft_config)
        if self._always_group_by_prompt:
            self.prefix_share_args.group_by_prompt = True
        options = self.prefix_share_args
        if options.group_by_prompt and (options.length_grouped_batches or options.max_batch_tokens is not None):
            raise ValueError(
                "`group_by_prompt` and `length_grouped_batches` / `max_batch_tokens` all choose the batches; set only "
                "one of them."
            )
        self._pair_weight: float | None = None  # token-budget batches: loss scale per pair of the current step
        if ref_model is None and _needs_reference_copy(model, args, peft_config):
            # TRL would reload the reference from `config._name_or_path`, which a model built from a config lacks
            # (it fails with an unhelpful repo-id error). The reference is the initial policy, so copy it.
            logger.info("The model has no path to reload a reference from: using a copy of the initial model.")
            ref_model = copy.deepcopy(model)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._install_prefix_sharing()

    # -- set-up ------------------------------------------------------------------------------------------------------

    def _prefix_share_switch(self) -> Switch:
        if self._is_vision_dataset:
            return enable_vision_prefix_sharing, verify_packed_forward
        return enable_prefix_sharing, verify_packed_forward

    def _wrap_collator(self, models: list[torch.nn.Module]) -> None:
        packing = self.prefix_share_packing
        grouping = GroupByPrompt(packing.max_row_tokens) if self.prefix_share_args.group_by_prompt else pair_documents
        collator_kwargs = dict(pad_token_id=self._tokenizer.pad_token_id, options=packing, group_documents=grouping)
        if self._is_vision_dataset:
            self.data_collator = PrefixSharedVisionPreferenceCollator(
                self.data_collator, image_token_id=vision_support(models[0]).image_token_id, **collator_kwargs
            )
        else:
            self.data_collator = PrefixSharedPreferenceCollator(self.data_collator, **collator_kwargs)

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        # Grouping by prompt needs pairs with the same prompt in one batch: a prompt-grouped, seeded shuffle.
        # Length grouping: similar lengths per batch, shuffled buckets (same batch size, same loss normalisation).
        dataset = self.train_dataset if train_dataset is None else train_dataset
        options = self.prefix_share_args
        by_length = options.length_grouped_batches or options.max_batch_tokens is not None
        if by_length and not isinstance(dataset, Dataset):
            raise ValueError(
                "`length_grouped_batches` and `max_batch_tokens` sort a map-style `datasets.Dataset` by length; a "
                "streaming/iterable dataset has no lengths up front. Materialise it or turn the option off."
            )
        wanted = options.group_by_prompt or by_length
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if wanted and self._is_vision_dataset and isinstance(dataset, Dataset):
            if by_length:
                raise ValueError(
                    "`length_grouped_batches` and `max_batch_tokens` sort by tokenized lengths, which vision data only "
                    "has in the collator (TRL processes images on the fly). Turn them off for image datasets."
                )
            return PromptGroupedSampler(vision_prompt_keys(dataset), batch_size=self._train_batch_size, seed=seed)
        if not wanted or not isinstance(dataset, Dataset) or "prompt_ids" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        if options.group_by_prompt:
            return prompt_grouped_sampler(dataset, self._train_batch_size, seed)
        if options.max_batch_tokens is not None:
            return TokenBudgetBatchSampler(
                packed_tokens(dataset),
                preference_lengths(dataset),
                options.max_batch_tokens,
                bucket_size=options.length_bucket_batches * self.args.per_device_train_batch_size,
                seed=seed,
                num_replicas=self.accelerator.num_processes,
                rank=self.accelerator.process_index,
            )
        return LengthGroupedBatchSampler(
            preference_lengths(dataset), self._train_batch_size, options.length_bucket_batches, seed
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        check_not_emptied(before, dataset, dataset_name, args.max_length)
        return validate_preference_dataset(
            dataset,
            dataset_name,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            max_row_tokens=self.prefix_share_args.max_row_tokens,
            drop_invalid=self.prefix_share_args.drop_invalid_examples,
        )

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        # Runs inside `DPOTrainer.__init__`: switch to the packed forward first so the precompute is shared too.
        self._install_prefix_sharing()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # -- step --------------------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.prefix_share_args.max_batch_tokens is not None and batch_samples:
            # Token-budget batches hold different numbers of pairs: weigh each pair of the step equally. Every rank
            # holds the same counts (see `token_budget.py`), so no communication is needed.
            self._pair_weight = len(batch_samples) / sum(pairs_in_batch(batch) for batch in batch_samples)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._log_token_counts(inputs)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._pair_weight is None or not model.training:
            return result
        scale = pairs_in_batch(inputs) * self._pair_weight
        return (result[0] * scale, result[1]) if return_outputs else result * scale

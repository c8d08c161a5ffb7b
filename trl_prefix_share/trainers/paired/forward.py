"""The shared-prefix ``concatenated_forward`` of TRL's ORPO and CPO trainers (also SimPO and AlphaPO through CPO).

``trl.experimental.orpo.ORPOTrainer`` and ``trl.experimental.cpo.CPOTrainer`` tokenize and truncate each example up
front (``tokenize_row``), pad a batch with their own collator, and stack it as ``[chosen rows; rejected rows]`` in
``concatenated_inputs``. That stacked batch is the *virtual* layout here: its rows become the sequences of the packed
layout (``layout.py``), so truncation and padding stay TRL's. The model's packed forward (``packed_forward.py``)
returns per-token log-probs in the virtual shifted layout, from which this module computes what TRL's own forward
returns (per-sequence sums or averages over completion tokens, the NLL term), and TRL's ``odds_ratio_loss`` /
``cpo_loss`` and metric code run unchanged on them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from trl.trainer.utils import add_fused_lm_head

from trl_prefix_share.core.collator import PACKED_KEY, PackingOptions, pair_documents, sequences_from_padded_batch
from trl_prefix_share.core.installer import fall_back, install_or_fall_back, model_to_patch, start_prefix_share
from trl_prefix_share.core.invalid_examples import refuse_or_drop_pairs
from trl_prefix_share.core.layout import IGNORE_INDEX, SequenceSpec, make_document, pack_documents
from trl_prefix_share.core.model_support import enable_prefix_sharing, verify_packed_forward
from trl_prefix_share.core.options import PrefixShareArguments, packing_options
from trl_prefix_share.core.trl_compat import PAIRED_HOOKS, check_hooks

check_hooks(PAIRED_HOOKS)
logger = logging.getLogger(__name__)

FUSED_OUTPUTS = ("log_probs", "mean_logits")

# -- layout of the stacked batch ---------------------------------------------------------------------------------------


def sequences_from_concatenated(concatenated: dict[str, torch.Tensor], score_chosen_prompt: bool) -> list[SequenceSpec]:
    """One sequence per row of TRL's ``[chosen; rejected]`` batch; completion = positions whose label is not -100.

    With ``score_chosen_prompt`` (ORPO's NLL term covers prompt + chosen), the chosen sequences are scored from their
    second token on, so a shared prompt is scored once, for the chosen sequence only.
    """
    labels = concatenated["concatenated_labels"]
    sequences = sequences_from_padded_batch(
        concatenated["concatenated_input_ids"], concatenated["concatenated_attention_mask"], labels != IGNORE_INDEX
    )
    if score_chosen_prompt:
        half = len(sequences) // 2
        sequences[:half] = [
            dataclasses.replace(seq, label_start=min(1, seq.completion_start)) for seq in sequences[:half]
        ]
    return sequences


def check_completions(labels: torch.Tensor) -> None:
    """Refuse a batch where a sequence has no completion token (stock TRL divides by zero there: a NaN loss)."""
    empty = (labels[:, 1:] == IGNORE_INDEX).all(dim=1)
    if bool(empty.any()):
        half = labels.size(0) // 2
        rows = empty.nonzero().squeeze(1).tolist()
        named = ", ".join(f"{'chosen' if r < half else 'rejected'} of pair {r % half}" for r in rows)
        raise ValueError(
            f"The batch has responses with no token left after truncation ({named}); their log-probability average "
            "is undefined (stock TRL returns a NaN loss). Raise `max_length`, shorten the prompts, or filter such "
            "examples out (the trainer does so up front for map-style datasets with `drop_invalid_examples=True`)."
        )


def pack_concatenated(
    concatenated: dict[str, torch.Tensor], pad_token_id: int, options: PackingOptions, score_chosen_prompt: bool
) -> dict[str, Any]:
    """The packed layout of TRL's stacked batch (CPU tensors in, CPU tensors out)."""
    input_ids = concatenated["concatenated_input_ids"]
    if input_ids.size(0) % 2:
        raise ValueError(f"Expected a [chosen; rejected] batch with an even number of rows, got {input_ids.size(0)}.")
    check_completions(concatenated["concatenated_labels"])
    sequences = sequences_from_concatenated(concatenated, score_chosen_prompt)
    return pack_documents(
        pair_documents(sequences, options.share_prefix),
        num_virtual_rows=input_ids.size(0),
        virtual_length=input_ids.size(1),
        pad_token_id=pad_token_id,
        **options.layout_kwargs(),
    )


class PairedPackingCollator:
    """Wraps the trainer's collator and adds the packed layout of its batch under ``batch["prefix_share"]``.

    Built in the data loader (CPU, possibly in worker processes), so the training step does not wait for it.

    Args:
        base_collator: TRL's ``DPODataCollatorWithPadding`` or any collator with the same keys.
        concatenate: the trainer's own ``concatenated_inputs`` with its arguments bound (stacks the padded batch).
        pad_token_id: id written into the padding of packed rows.
        options: packing options.
        score_chosen_prompt: score the chosen sequences' prompt tokens too (ORPO).
    """

    def __init__(
        self,
        base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        concatenate: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
        pad_token_id: int,
        options: PackingOptions,
        score_chosen_prompt: bool,
    ) -> None:
        self.base_collator = base_collator
        self.concatenate = concatenate
        self.pad_token_id = pad_token_id
        self.options = options
        self.score_chosen_prompt = score_chosen_prompt

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base_collator(features)
        missing = {
            f"{side}_{key}" for side in ("chosen", "rejected") for key in ("input_ids", "attention_mask", "labels")
        }
        missing -= set(batch)
        if missing:
            raise ValueError(
                f"The data collator's batch lacks {sorted(missing)}; prefix sharing needs the ORPO/CPO batch layout "
                "(`chosen_*` and `rejected_*` input ids, attention masks and labels, right-padded)."
            )
        batch[PACKED_KEY] = pack_concatenated(
            self.concatenate(batch), self.pad_token_id, self.options, self.score_chosen_prompt
        )
        return batch


# -- reductions in the virtual shifted layout --------------------------------------------------------------------------


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


# -- up-front dataset check --------------------------------------------------------------------------------------------


def _completion_start(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def document_tokens(example: dict[str, list[int]], share_prefix: bool, score_chosen_prompt: bool) -> int:
    """Tokens the packed document of one tokenized example occupies (exact: same rules as the layout)."""
    specs = []
    for row, side in enumerate(("chosen", "rejected")):
        tokens = torch.tensor(example[f"{side}_input_ids"], dtype=torch.long)
        start = _completion_start(example[f"{side}_labels"])
        label_start = min(1, start) if score_chosen_prompt and side == "chosen" else None
        specs.append(SequenceSpec(tokens=tokens, completion_start=start, virtual_row=row, label_start=label_start))
    return make_document(specs, share_prefix).num_tokens


def validate_paired_dataset(
    dataset: Any,
    dataset_name: str,
    options: PrefixShareArguments,
    score_chosen_prompt: bool,
) -> Any:
    """Raise on (or drop, with ``drop_invalid_examples``) tokenized examples prefix sharing cannot train on.

    Checked on TRL's ``tokenize_row`` output (map-style datasets; others are checked batch by batch at packing):
    an empty chosen or rejected response after truncation (TRL truncates the response, never the prompt, so a long
    prompt leaves nothing; stock TRL then returns a NaN loss), and a document longer than ``max_row_tokens``.
    """
    if not isinstance(dataset, Dataset):
        return dataset
    keys = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    empty: list[int] = []
    too_long: list[tuple[int, int]] = []
    index = 0
    for batch in dataset.select_columns(keys).iter(batch_size=1000):
        for values in zip(*(batch[key] for key in keys), strict=True):
            example = dict(zip(keys, values, strict=True))
            if all(label == IGNORE_INDEX for label in example["chosen_labels"][1:]) or all(
                label == IGNORE_INDEX for label in example["rejected_labels"][1:]
            ):
                empty.append(index)
            elif options.max_row_tokens is not None:
                length = document_tokens(example, options.share_prefix, score_chosen_prompt)
                if length > options.max_row_tokens:
                    too_long.append((index, length))
            index += 1
    reason = (
        "after truncation (the prompt alone fills `max_length`; stock TRL would return a NaN loss). Raise "
        "`max_length` or filter out long prompts"
    )
    return refuse_or_drop_pairs(
        dataset,
        dataset_name,
        empty,
        reason,
        too_long,
        options.max_row_tokens,
        options.drop_invalid_examples,
        logger,
    )


# -- the trainer mixin -------------------------------------------------------------------------------------------------


class PrefixSharedPairedMixin:
    """Turns ``ORPOTrainer`` / ``CPOTrainer`` into their shared-prefix versions (put it first in the bases).

    Replaces ``concatenated_forward`` only; tokenization, truncation, padding, the losses and the metrics stay the
    trainer's own. Subclasses say what differs between ORPO and CPO through the three hooks below.
    """

    #: Score the chosen sequences' prompt tokens (ORPO's NLL term covers prompt + chosen).
    score_chosen_prompt: bool = False

    def _average_log_prob(self) -> bool:
        """Whether TRL averages the per-sequence log-probs over completion tokens (else sums them)."""
        raise NotImplementedError

    def _chosen_nll(self, log_probs: torch.Tensor, label_mask: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        """The NLL term from the chosen rows' per-token log-probs, scored-position mask and completion mask."""
        raise NotImplementedError

    def _concatenation_padding_value(self) -> int:
        """The ``padding_value`` the trainer passes to ``concatenated_inputs``."""
        raise NotImplementedError

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        preprocess_logits_for_metrics: Any = None,
        peft_config: Any = None,
        compute_metrics: Any = None,
    ) -> None:
        start_prefix_share(self, args, peft_config)
        self._prefix_share_step_tokens: tuple[int, int] | None = None
        if model_init is not None:
            raise ValueError(
                "`model_init` (hyperparameter search) re-creates the model at `train()`, without the packed forward "
                "this trainer installs. Pass the model itself, or use the stock trainer for the search."
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            compute_metrics=compute_metrics,
        )
        self._install_prefix_sharing()
        if self.prefix_share_fallback is not None:
            return  # the exact fallback trains on the datasets exactly as stock does
        self.train_dataset = validate_paired_dataset(
            self.train_dataset, "train", self.prefix_share_args, self.score_chosen_prompt
        )
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                name: validate_paired_dataset(data, f"eval ({name})", self.prefix_share_args, self.score_chosen_prompt)
                for name, data in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = validate_paired_dataset(
                self.eval_dataset, "eval", self.prefix_share_args, self.score_chosen_prompt
            )

    def _install_prefix_sharing(self) -> None:
        """Add TRL's fused LM head and the packed forward to the causal LM, and wrap the collator."""
        if self.is_encoder_decoder:
            fall_back(
                self,
                f"{type(self.model).__name__} is an encoder-decoder model (prefix sharing packs decoder-only "
                "sequences)",
            )
            return
        self._prefix_share_packing, kernel = packing_options(self.prefix_share_args, self.accelerator.device)
        causal_lm = model_to_patch(self.model)

        def enable(model: torch.nn.Module, kernel: str) -> None:
            add_fused_lm_head(model, outputs=FUSED_OUTPUTS)
            enable_prefix_sharing(model, kernel)

        if not install_or_fall_back(self, [causal_lm], enable, verify_packed_forward, kernel):
            return  # exact fallback: TRL's own collator and concatenated_forward
        self.data_collator = PairedPackingCollator(
            self.data_collator,
            concatenate=functools.partial(
                self.concatenated_inputs, is_encoder_decoder=False, padding_value=self._concatenation_padding_value()
            ),
            pad_token_id=self._concatenation_padding_value(),
            options=self._prefix_share_packing,
            score_chosen_prompt=self.score_chosen_prompt,
        )

    def concatenated_forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """TRL's ``concatenated_forward``, computed from one packed forward where each prompt is run once.

        Returns the trainer's own tuple ``(chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll_loss)``
        (plus ``aux_loss`` for MoE models with router logits), equal to stock's except for the two *logits* entries.
        Stock returns the full ``[B, L, V]`` logits (CPO) or ``[B, L-1, V]`` (ORPO) only for the ``logits/chosen``
        and ``logits/rejected`` metrics (their ``.mean()``), and that mean runs over every position of the padded
        rows, prompt and padding included. Computing those would cost the work sharing saves, so here they are 1-D
        tensors holding, for each completion token of the chosen (rejected) responses, the mean of its next-token
        logits over the vocabulary (the fused head's ``mean_logits``): their ``.mean()`` is the mean logit over the
        real completion tokens. Those two metrics therefore differ from stock's; every other value is equal.
        """
        if self.prefix_share_fallback is not None:
            return self._stock_concatenated_forward(model, batch)
        device = self.accelerator.device
        concatenated = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self._concatenation_padding_value(), device=device
        )
        packed = batch.get(PACKED_KEY)
        if packed is None:  # a batch that did not come through our collator
            cpu = {key: value.cpu() for key, value in concatenated.items()}
            packed = self._prepare_input(
                pack_concatenated(
                    cpu, self._concatenation_padding_value(), self._prefix_share_packing, self.score_chosen_prompt
                )
            )
        input_ids = concatenated["concatenated_input_ids"]
        self._prefix_share_step_tokens = (packed["input_ids"].numel(), input_ids.numel())
        model_kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
        outputs = model(
            input_ids=input_ids,
            use_cache=False,
            fused_lm_head=True,
            **{PACKED_KEY: packed},
            **model_kwargs,
        )
        half = input_ids.size(0) // 2
        completion = completion_mask(concatenated["concatenated_labels"])
        logps = sequence_log_probs(outputs.log_probs, completion, average=self._average_log_prob())
        nll_loss = self._chosen_nll(outputs.log_probs[:half], outputs.label_mask[:half], completion[:half])
        mean_logits = outputs.mean_logits
        chosen_logits = scored_mean_logits(mean_logits[:half], completion[:half])
        rejected_logits = scored_mean_logits(mean_logits[half:], completion[half:])
        result = (logps[:half], logps[half:], chosen_logits, rejected_logits, nll_loss)
        if self.aux_loss_enabled:
            return (*result, outputs.aux_loss)
        return result

    def _stock_concatenated_forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The exact fallback: TRL's own forward; both token counts are those of its stacked padded batch (for an
        encoder-decoder: the stacked labels plus the prompt encoded for both halves)."""
        side = "input_ids" if "chosen_input_ids" in batch else "labels"
        rows = 2 * batch[f"chosen_{side}"].size(0)
        tokens = rows * max(batch[f"chosen_{side}"].size(1), batch[f"rejected_{side}"].size(1))
        if side == "labels":
            tokens += 2 * batch["prompt_input_ids"].numel()
        self._prefix_share_step_tokens = (tokens, tokens)
        return super().concatenated_forward(model, batch)

    def get_batch_loss_metrics(self, model: torch.nn.Module, batch: dict[str, Any], train_eval: str = "train"):
        """The trainer's loss and metrics, plus the token counts of this step (`prefix_share/*`)."""
        loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval=train_eval)
        if self._prefix_share_step_tokens is not None:
            ours, stock = self._prefix_share_step_tokens
            self._prefix_share_step_tokens = None
            if self.accelerator.num_processes > 1:
                counts = torch.tensor([[ours, stock]], device=self.accelerator.device)
                ours, stock = self.accelerator.gather_for_metrics(counts).sum(0).tolist()
            if train_eval == "train":
                self.prefix_share_totals["tokens"] += ours
                self.prefix_share_totals["stock_tokens"] += stock
            prefix = "eval_" if train_eval == "eval" else ""
            metrics[f"{prefix}prefix_share/tokens"] = float(ours)
            metrics[f"{prefix}prefix_share/stock_tokens"] = float(stock)
            metrics[f"{prefix}prefix_share/token_ratio"] = stock / max(ours, 1)
        return loss, metrics

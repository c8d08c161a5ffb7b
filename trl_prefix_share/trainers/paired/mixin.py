"""``PrefixSharedPairedMixin``: the shared-prefix ``concatenated_forward`` of TRL's ORPO and CPO trainers (also SimPO
and AlphaPO through CPO).

The collator (``core.paired.collator``) lays out TRL's stacked ``[chosen; rejected]`` batch; the model's packed forward
(``core.packed_forward``) returns per-token log-probs in its virtual shifted layout, from which
``core.paired.reductions`` computes what TRL's own forward returns, and TRL's ``odds_ratio_loss`` / ``cpo_loss`` and
metric code run unchanged on them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from trl.trainer.utils import add_fused_lm_head

from trl_prefix_share.core.model_support import enable_prefix_sharing, verify_packed_forward
from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.core.paired.collator import PairedPackingCollator, pack_concatenated
from trl_prefix_share.core.paired.reductions import completion_mask, scored_mean_logits, sequence_log_probs
from trl_prefix_share.core.trl_compat import PAIRED_HOOKS, check_hooks
from trl_prefix_share.trainers.paired.validation import validate_paired_dataset
from trl_prefix_share.trainers.wiring import PrefixSharingMixin, Switch

check_hooks(PAIRED_HOOKS)

#: What the fused LM head returns for these trainers: per-token log-probs and the vocabulary-mean logits.
FUSED_OUTPUTS = ("log_probs", "mean_logits")


def _enable_with_fused_head(model: torch.nn.Module, kernel: str) -> None:
    """TRL's fused LM head (these trainers do not add it themselves), then the packed forward."""
    add_fused_lm_head(model, outputs=FUSED_OUTPUTS)
    enable_prefix_sharing(model, kernel)


class PrefixSharedPairedMixin(PrefixSharingMixin):
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
        self._start_prefix_share(args, peft_config)
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

    def _prefix_share_refusal(self) -> str | None:
        if self.is_encoder_decoder:
            return (
                f"{type(self.model).__name__} is an encoder-decoder model (prefix sharing packs decoder-only sequences)"
            )
        return None

    def _prefix_share_switch(self) -> Switch:
        return _enable_with_fused_head, verify_packed_forward

    def _wrap_collator(self, models: list[torch.nn.Module]) -> None:
        self.data_collator = PairedPackingCollator(
            self.data_collator,
            concatenate=functools.partial(
                self.concatenated_inputs, is_encoder_decoder=False, padding_value=self._concatenation_padding_value()
            ),
            pad_token_id=self._concatenation_padding_value(),
            options=self.prefix_share_packing,
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
                    cpu, self._concatenation_padding_value(), self.prefix_share_packing, self.score_chosen_prompt
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

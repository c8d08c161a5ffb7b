"""The hook both online trainers share: TRL's per-token log-prob pass, with each prompt run once per group.

TRL's ``_get_per_token_logps_and_entropies`` serves the policy forward (with gradients), the old-policy pass and the
reference pass alike. Here it packs the rows whose prompt tokens are identical into one document with one branch
per distinct completion, calls the model (the policy, the reference, or the adapter-disabled policy) with that
layout, and returns TRL's ``[B, logits_to_keep]`` tensors, so every line of TRL's loss code runs unchanged. Rows it
cannot lay out (vision inputs, a mask that is not left-padded prompt + right-padded completion, an empty prompt) are
scored by TRL's own code: exact, just without the saving.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from trl.extras.profiling import profiling_decorator

from trl_prefix_share.core.online.rows import UnshareableRows, chunk_by_prompt, pack_completion_rows, read_rows
from trl_prefix_share.core.online.support import enable_online_prefix_sharing, verify_online_forward
from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.core.token_metrics import log_token_counts
from trl_prefix_share.core.trl_compat import ONLINE_HOOKS, check_hooks
from trl_prefix_share.trainers.wiring import PrefixSharingMixin, Switch

check_hooks(ONLINE_HOOKS)

logger = logging.getLogger(__name__)


class PrefixSharedScoringMixin(PrefixSharingMixin):
    """Mixed in before ``trl.GRPOTrainer`` / ``trl.RLOOTrainer``: their hook is the log-prob pass below, not a
    collator (TRL builds those rows itself, after generation)."""

    def _start_prefix_share(self, args: Any, peft_config: Any) -> None:
        super()._start_prefix_share(args, peft_config)
        self._prefix_share_layouts: tuple[Any, ...] | None = None
        self._prefix_share_warned = False

    def _prefix_share_switch(self) -> Switch:
        return enable_online_prefix_sharing, verify_online_forward

    @profiling_decorator  # TRL's own timing of this pass (its `profiling/Time taken: ...` metric), as in stock
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal: Any,
    ):
        def stock():
            if compute_entropy:  # the policy pass: one token count per micro-batch, like the preference trainers
                log_token_counts(self, input_ids.numel(), input_ids.numel())
            # TRL's pass without its profiling wrapper: this method's own wrapper already times the call
            stock_pass = super(PrefixSharedScoringMixin, type(self))._get_per_token_logps_and_entropies
            stock_pass = getattr(stock_pass, "__wrapped__", stock_pass)
            return stock_pass(
                self,
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **multimodal,
            )

        if not self.prefix_share_enabled or any(v is not None for v in multimodal.values()):
            return stock()  # the exact fallback, or image prompts (scored by TRL until vision prompts are served)
        try:
            chunks = self._packed_chunks(input_ids, attention_mask, logits_to_keep, batch_size)
        except UnshareableRows as why:
            if not self._prefix_share_warned:
                logger.warning("Scoring a batch the stock way (exact, no sharing): %s.", why)
                self._prefix_share_warned = True
            return stock()

        all_logps, all_entropies, all_aux_losses = [], [], []
        packed_tokens = 0
        for rows, packed in chunks:
            ids, mask = (input_ids, attention_mask) if rows is None else (input_ids[rows], attention_mask[rows])
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            model_inputs = {"input_ids": ids, "attention_mask": mask, PACKED_KEY: packed}
            if compute_aux_loss:
                model_inputs["output_router_logits"] = True
            with self.accelerator.autocast():
                outputs = model(**model_inputs, labels=labels, fused_lm_head=True)
            all_logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                all_entropies.append(outputs.entropy[:, -logits_to_keep:])
            if compute_aux_loss:
                all_aux_losses.append(outputs.aux_loss)
            packed_tokens += packed["input_ids"].numel()

        # Chunks of whole groups need not be contiguous: put the rows back in the batch's order.
        restore = None if chunks[0][0] is None else torch.cat([rows for rows, _ in chunks]).argsort()
        logps = _in_row_order(torch.cat(all_logps), restore)
        entropies = _in_row_order(torch.cat(all_entropies), restore) if compute_entropy else None
        aux_loss = torch.stack(all_aux_losses).mean() if compute_aux_loss else None
        if compute_entropy:
            log_token_counts(self, packed_tokens, input_ids.numel())
        return logps, entropies, aux_loss

    def _packed_chunks(self, input_ids, attention_mask, logits_to_keep, batch_size):
        """(rows on the batch's device, or None for the whole batch; packed layout) per chunk, reused while the same
        rows are scored again (old policy, reference)."""
        cached = self._prefix_share_layouts
        key = (input_ids.shape, input_ids._version, attention_mask.data_ptr(), attention_mask._version)
        key += (logits_to_keep, batch_size)
        if cached is not None and cached[0]() is input_ids and cached[1] == key:
            return cached[2]
        pad = self._tokenizer.pad_token_id or 0
        if batch_size is None or batch_size >= input_ids.size(0):
            packed = pack_completion_rows(input_ids, attention_mask, logits_to_keep, pad, self.prefix_share_packing)
            chunks = [(None, packed)]
        else:
            shape = read_rows(input_ids, attention_mask, logits_to_keep)
            row_tokens = attention_mask.sum(dim=1).cpu()
            chunks = []
            for rows in chunk_by_prompt(shape, row_tokens, batch_size, input_ids.size(1)):
                rows = rows.to(input_ids.device)
                ids, mask = input_ids[rows], attention_mask[rows]
                chunks.append((rows, pack_completion_rows(ids, mask, logits_to_keep, pad, self.prefix_share_packing)))
        self._prefix_share_layouts = (weakref.ref(input_ids), key, chunks)
        return chunks


def _in_row_order(values: torch.Tensor, restore: torch.Tensor | None) -> torch.Tensor:
    return values if restore is None else values[restore]

"""Set-up steps every prefix-shared trainer takes the same way: reading our options off the config, refusing adapters
that cannot be laid out, finding the model to patch, and probing it unless its parameters are sharded."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import is_peft_model

from .options import PrefixShareArguments, prefix_share_arguments

logger = logging.getLogger(__name__)

PROMPT_LEARNING_ERROR = (
    "Prompt-learning PEFT methods (prefix/prompt tuning) prepend virtual tokens to every sequence, which prefix "
    "sharing cannot lay out. Use a LoRA-style adapter, or the stock trainer."
)


def start_prefix_share(trainer: Any, args: Any, peft_config: Any) -> None:
    """First lines of every ``__init__``: our options (defaults for a plain TRL config), the token totals behind the
    `prefix_share/*` metrics, and an early refusal of prompt-learning adapters (before TRL wraps the model)."""
    trainer.prefix_share_args = prefix_share_arguments(args) if args is not None else PrefixShareArguments()
    trainer.prefix_share_totals = {"tokens": 0, "stock_tokens": 0}
    reject_prompt_learning(peft_config)


def reject_prompt_learning(*peft_configs: Any) -> None:
    if any(getattr(config, "is_prompt_learning", False) for config in peft_configs):
        raise ValueError(PROMPT_LEARNING_ERROR)


def model_to_patch(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (whose forward we replace), or the model itself."""
    if not is_peft_model(model):
        return model
    reject_prompt_learning(*model.peft_config.values())
    return model.get_base_model()


def probe_models(trainer: Any, models: list[torch.nn.Module], probe: Callable[..., None], kernel: str) -> None:
    """Run ``probe(model, kernel, device)`` on each model when `verify_model` is on, except under DeepSpeed / FSDP,
    where parameters stay sharded until training starts."""
    if not trainer.prefix_share_args.verify_model:
        return
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        logger.info("Skipping the packed-forward probe: parameters are sharded until training starts.")
        return
    for model in models:
        probe(model, kernel, trainer.accelerator.device)

"""Set-up steps every prefix-shared trainer takes the same way: reading our options off the config, refusing adapters
that cannot be laid out, finding the model to patch, switching and probing it (unless its parameters are sharded),
and the exact fallback to stock training for a model the packed path cannot serve."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import is_peft_model

from trl_prefix_share.core.model_structure import SUPPORT_HINT
from trl_prefix_share.core.model_support import UnsupportedModelError, check_architecture, restore_attention
from trl_prefix_share.core.options import PrefixShareArguments, prefix_share_arguments
from trl_prefix_share.core.tested_versions import with_drift_note

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
    trainer.prefix_share_fallback = None  # the reason, once the trainer trains like stock TRL
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


class PrefixShareFallbackWarning(UserWarning):
    """A prefix-shared trainer trains exactly like the stock TRL trainer, without sharing, for the reason given."""


#: Errors a probe's packed forward may end in on a model it cannot serve (an unknown keyword, a refused rule).
_PROBE_FAILURES = (NotImplementedError, RuntimeError, TypeError, ValueError)


def probe_models(trainer: Any, models: list[torch.nn.Module], probe: Callable[..., None], kernel: str) -> None:
    """Run ``probe(model, kernel, device)`` on each model when `verify_model` is on, except under DeepSpeed / FSDP,
    where parameters stay sharded until training starts (the structural check alone guards those launchers)."""
    if not trainer.prefix_share_args.verify_model:
        return
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        logger.info("Skipping the packed-forward probe: parameters are sharded; the structural check still applies.")
        return
    for model in models:
        try:
            probe(model, kernel, trainer.accelerator.device)
        except UnsupportedModelError:
            raise
        except torch.OutOfMemoryError:
            raise
        except _PROBE_FAILURES as error:
            raise UnsupportedModelError(
                f"{type(model).__name__}: its packed forward failed on the construction probe ({error})"
            ) from error


def install_or_fall_back(
    trainer: Any,
    models: Sequence[torch.nn.Module],
    enable: Callable[[torch.nn.Module, str], None],
    probe: Callable[..., None],
    kernel: str,
) -> bool:
    """Switch ``models`` to the packed forward and probe them; True when prefix sharing is on.

    A model the packed path cannot serve exactly (the structural check, run first and under every launcher, or the
    probe) is restored to its own attention, and the trainer trains like stock TRL: one warning naming the reason,
    `prefix_share/token_ratio` 1.0. With `on_unsupported_model="error"` it raises instead.
    """
    try:
        for model in models:
            check_architecture(model)
        for model in models:
            enable(model, kernel)
        probe_models(trainer, list(models), probe, kernel)
    except UnsupportedModelError as error:
        for model in models:
            restore_attention(model)
        fall_back(trainer, str(error))
        return False
    return True


def fall_back(trainer: Any, reason: str) -> None:
    """Record the fallback and warn once, or raise when the user asked for an error."""
    name = type(trainer).__name__
    reason = with_drift_note(reason)
    if trainer.prefix_share_args.on_unsupported_model == "error":
        raise UnsupportedModelError(
            f"{name} cannot share prefixes exactly for this model: {reason}. Use the stock TRL trainer, or leave "
            "`on_unsupported_model='fallback'` (the default) to train exactly like it."
        )
    trainer.prefix_share_fallback = reason
    warnings.warn(
        f"{name} trains exactly like the stock TRL trainer for this model, without prefix sharing (no speed-up; "
        f"`prefix_share/token_ratio` is 1.0): {reason}. {SUPPORT_HINT}",
        PrefixShareFallbackWarning,
        stacklevel=3,
    )

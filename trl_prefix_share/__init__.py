"""trl-prefix-share: paired preference training with each prompt run once (drop-in TRL trainers)."""
# ruff: noqa: E402 - the version check runs before the submodules import TRL internals

import importlib

from .trl_compat import check_hooks

check_hooks()  # before anything imports a TRL internal: one clear error on an unsupported TRL / transformers

from .attention import ATTENTION_NAME, register_attention
from .collator import PrefixSharedPreferenceCollator
from .dpo_config import PrefixSharedDPOConfig
from .dpo_trainer import PrefixSharedDPOTrainer
from .grouped_dpo_trainer import GroupedPrefixSharedDPOTrainer
from .grouping import GroupByPrompt, PromptGroupedSampler
from .model_support import UnsupportedModelError
from .options import PrefixShareArguments
from .reward_config import PrefixSharedRewardConfig
from .reward_trainer import PrefixSharedRewardTrainer
from .sdpo import StepwiseDPO, StepwiseDPOConfig
from .trainer_setup import PrefixShareFallbackWarning

__version__ = "0.1.0"

# ORPO and CPO live in `trl.experimental`, whose import warns: load them only when asked for.
_LAZY = {
    "PrefixSharedCPOConfig": ".cpo_trainer",
    "PrefixSharedCPOTrainer": ".cpo_trainer",
    "PrefixSharedORPOConfig": ".orpo_trainer",
    "PrefixSharedORPOTrainer": ".orpo_trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTENTION_NAME",
    "GroupByPrompt",
    "GroupedPrefixSharedDPOTrainer",
    "PrefixSharedCPOConfig",
    "PrefixSharedCPOTrainer",
    "PrefixSharedORPOConfig",
    "PrefixSharedORPOTrainer",
    "PrefixSharedRewardConfig",
    "PrefixSharedRewardTrainer",
    "PromptGroupedSampler",
    "StepwiseDPO",
    "StepwiseDPOConfig",
    "PrefixShareArguments",
    "PrefixSharedDPOConfig",
    "PrefixSharedDPOTrainer",
    "PrefixSharedPreferenceCollator",
    "PrefixShareFallbackWarning",
    "UnsupportedModelError",
    "register_attention",
]

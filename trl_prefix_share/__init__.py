"""trl-prefix-share: paired preference training with each prompt run once (drop-in TRL trainers)."""
# ruff: noqa: E402 - the version check runs before the submodules import TRL internals

import importlib

from trl_prefix_share.core.trl_compat import check_hooks

check_hooks()  # before anything imports a TRL internal: one clear error on an unsupported TRL / transformers

from trl_prefix_share.core.attention import ATTENTION_NAME, register_attention
from trl_prefix_share.core.installer import PrefixShareFallbackWarning
from trl_prefix_share.core.model_support import UnsupportedModelError
from trl_prefix_share.core.options import PrefixShareArguments
from trl_prefix_share.core.preference.collator import PrefixSharedPreferenceCollator
from trl_prefix_share.trainers.dpo.config import PrefixSharedDPOConfig
from trl_prefix_share.trainers.dpo.grouped import GroupedPrefixSharedDPOTrainer
from trl_prefix_share.trainers.dpo.grouping import GroupByPrompt, PromptGroupedSampler
from trl_prefix_share.trainers.dpo.trainer import PrefixSharedDPOTrainer
from trl_prefix_share.trainers.reward.config import PrefixSharedRewardConfig
from trl_prefix_share.trainers.reward.trainer import PrefixSharedRewardTrainer
from trl_prefix_share.trainers.stepwise import StepwiseDPO, StepwiseDPOConfig

__version__ = "0.1.0"

# ORPO and CPO live in `trl.experimental`, whose import warns, and the online trainers pull in TRL's GRPO/RLOO
# (generation, rewards): load them only when asked for.
_LAZY = {
    "PrefixSharedGRPOConfig": ".trainers.online.config",
    "PrefixSharedGRPOTrainer": ".trainers.online.grpo",
    "PrefixSharedRLOOConfig": ".trainers.online.config",
    "PrefixSharedRLOOTrainer": ".trainers.online.rloo",
    "PrefixSharedCPOConfig": ".trainers.paired.cpo",
    "PrefixSharedCPOTrainer": ".trainers.paired.cpo",
    "PrefixSharedORPOConfig": ".trainers.paired.orpo",
    "PrefixSharedORPOTrainer": ".trainers.paired.orpo",
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
    "PrefixSharedGRPOConfig",
    "PrefixSharedGRPOTrainer",
    "PrefixSharedRLOOConfig",
    "PrefixSharedRLOOTrainer",
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

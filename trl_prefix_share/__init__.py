"""trl-prefix-share: paired preference training with each prompt run once (drop-in TRL trainers)."""

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

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_NAME",
    "GroupByPrompt",
    "GroupedPrefixSharedDPOTrainer",
    "PrefixSharedRewardConfig",
    "PrefixSharedRewardTrainer",
    "PromptGroupedSampler",
    "StepwiseDPO",
    "StepwiseDPOConfig",
    "PrefixShareArguments",
    "PrefixSharedDPOConfig",
    "PrefixSharedDPOTrainer",
    "PrefixSharedPreferenceCollator",
    "UnsupportedModelError",
    "register_attention",
]

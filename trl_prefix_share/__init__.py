"""trl-prefix-share: paired preference training with each prompt run once (drop-in TRL trainers)."""

from .attention import ATTENTION_NAME, register_attention
from .collator import PrefixSharedPreferenceCollator
from .dpo_config import PrefixSharedDPOConfig
from .dpo_trainer import PrefixSharedDPOTrainer
from .model_support import UnsupportedModelError
from .options import PrefixShareArguments

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_NAME",
    "PrefixShareArguments",
    "PrefixSharedDPOConfig",
    "PrefixSharedDPOTrainer",
    "PrefixSharedPreferenceCollator",
    "UnsupportedModelError",
    "register_attention",
]

"""``PrefixSharedDPOConfig``: TRL's ``DPOConfig`` plus the prefix-sharing knobs."""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig

from trl_prefix_share.core.options import PrefixShareArguments


@dataclass
class PrefixSharedDPOConfig(DPOConfig, PrefixShareArguments):
    """Configuration of [`PrefixSharedDPOTrainer`]: every [`~trl.DPOConfig`] field plus [`PrefixShareArguments`]."""

"""``PrefixSharedRewardConfig``: TRL's ``RewardConfig`` plus the prefix-sharing knobs."""

from __future__ import annotations

from dataclasses import dataclass

from trl import RewardConfig

from trl_prefix_share.core.options import PrefixShareArguments


@dataclass
class PrefixSharedRewardConfig(RewardConfig, PrefixShareArguments):
    """Configuration of [`PrefixSharedRewardTrainer`]: every [`~trl.RewardConfig`] field plus
    [`PrefixShareArguments`]."""

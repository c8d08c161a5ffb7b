"""Reward models: `PrefixSharedRewardTrainer` on `trl.RewardTrainer`, its config, validation and ranked lists."""

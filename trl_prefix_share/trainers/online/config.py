"""``PrefixSharedGRPOConfig`` / ``PrefixSharedRLOOConfig``: TRL's configs plus the prefix-sharing knobs.

A plain ``GRPOConfig`` / ``RLOOConfig`` works as well (every knob takes its default). Of the knobs, the DPO-only ones
(`group_by_prompt`, `length_grouped_batches`, `max_batch_tokens`, `drop_invalid_examples`) do nothing here: TRL's
sampler already puts a prompt's completions next to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig, RLOOConfig

from trl_prefix_share.core.options import PrefixShareArguments


@dataclass
class PrefixSharedGRPOConfig(GRPOConfig, PrefixShareArguments):
    """Configuration of [`PrefixSharedGRPOTrainer`]: every [`~trl.GRPOConfig`] field plus [`PrefixShareArguments`]."""


@dataclass
class PrefixSharedRLOOConfig(RLOOConfig, PrefixShareArguments):
    """Configuration of [`PrefixSharedRLOOTrainer`]: every [`~trl.RLOOConfig`] field plus [`PrefixShareArguments`]."""

"""Which trainer and config each benchmark run uses: a kind (dpo, orpo, simpo, cpo, reward) x a variant.

Variants (the ablation matrix of sharing x packing):

- ``stock``: TRL's own trainer, padded ``[chosen; rejected]`` batch (no sharing, no packing);
- ``unshared``: ours with ``share_prefix=False``: packed, padding-free, each sequence its own document: the honest
  "padding-free TRL" baseline;
- ``unpacked``: ours with ``pack_documents=False``: prompt shared, one document per row, rows padded;
- ``one_level``: ours with ``prefix_tree=False``: each prompt shared by its own responses only (no prefix trees);
- ``ours``: ours with the defaults: shared and packed, prompts merged into prefix trees.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

VARIANTS = ("stock", "unshared", "unpacked", "one_level", "ours")
#: The cells a plain `bench` runs (``one_level`` on request: it differs from ``ours`` only where prompts share a start).
DEFAULT_VARIANTS = ("stock", "unshared", "unpacked", "ours")
VARIANT_OPTIONS: dict[str, dict[str, bool]] = {
    "stock": {},
    "unshared": {"share_prefix": False},
    "unpacked": {"pack_documents": False},
    "one_level": {"prefix_tree": False},
    "ours": {},
}
VARIANT_LABELS = {
    "stock": "stock TRL",
    "unshared": "packed, unshared",
    "unpacked": "shared, unpacked",
    "one_level": "shared, one-level",
    "ours": "shared + packed",
}
KINDS = ("dpo", "orpo", "simpo", "cpo", "reward")
KIND_LABELS = {"dpo": "DPO", "orpo": "ORPO", "simpo": "SimPO", "cpo": "CPO", "reward": "reward"}


@dataclass(frozen=True)
class TrainerPair:
    """Stock and prefix-shared trainer and config classes of one kind, and config fields the kind sets."""

    stock_trainer: type
    stock_config: type
    our_trainer: type
    our_config: type
    config_overrides: dict[str, Any]


def _dpo() -> TrainerPair:
    from trl import DPOConfig, DPOTrainer

    from trl_prefix_share.trainers.dpo.config import PrefixSharedDPOConfig
    from trl_prefix_share.trainers.dpo.trainer import PrefixSharedDPOTrainer

    return TrainerPair(DPOTrainer, DPOConfig, PrefixSharedDPOTrainer, PrefixSharedDPOConfig, {})


def _paired(kind: str) -> TrainerPair:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        from trl_prefix_share.trainers.paired.orpo import PrefixSharedORPOConfig, PrefixSharedORPOTrainer

        return TrainerPair(ORPOTrainer, ORPOConfig, PrefixSharedORPOTrainer, PrefixSharedORPOConfig, {})
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from trl_prefix_share.trainers.paired.cpo import PrefixSharedCPOConfig, PrefixSharedCPOTrainer

    overrides = {"loss_type": "simpo", "cpo_alpha": 0.0} if kind == "simpo" else {}
    return TrainerPair(CPOTrainer, CPOConfig, PrefixSharedCPOTrainer, PrefixSharedCPOConfig, overrides)


def _reward() -> TrainerPair:
    from trl import RewardConfig, RewardTrainer

    from trl_prefix_share.trainers.reward.config import PrefixSharedRewardConfig
    from trl_prefix_share.trainers.reward.trainer import PrefixSharedRewardTrainer

    return TrainerPair(RewardTrainer, RewardConfig, PrefixSharedRewardTrainer, PrefixSharedRewardConfig, {})


_FACTORIES: dict[str, Callable[[], TrainerPair]] = {
    "dpo": _dpo,
    "orpo": lambda: _paired("orpo"),
    "simpo": lambda: _paired("simpo"),
    "cpo": lambda: _paired("cpo"),
    "reward": _reward,
}


def trainer_pair(kind: str) -> TrainerPair:
    """The classes of one kind (imported on demand: ORPO/CPO live in `trl.experimental`)."""
    if kind not in _FACTORIES:
        raise ValueError(f"Unknown trainer kind {kind!r}; choose from {', '.join(KINDS)}.")
    return _FACTORIES[kind]()


def make_trainer(kind: str, variant: str, common: dict[str, Any], model: str, tokenizer: Any, dataset: Any) -> Any:
    """Build the trainer of one run. ``common`` holds the config fields every run shares (same seed, steps, ...)."""
    pair = trainer_pair(kind)
    fields = {**common, **pair.config_overrides}
    if variant == "stock":
        config, trainer_class = pair.stock_config(**fields), pair.stock_trainer
    else:
        config, trainer_class = pair.our_config(**fields, **VARIANT_OPTIONS[variant]), pair.our_trainer
    return trainer_class(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)

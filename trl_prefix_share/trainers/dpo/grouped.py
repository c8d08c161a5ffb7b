"""``GroupedPrefixSharedDPOTrainer``: DPO with every prompt of a batch run once for all its pairs.

Opt-in, because it changes which examples share a batch: the training order comes from ``PromptGroupedSampler``
(pairs with the same prompt batched together, still shuffled and seeded by ``data_seed``/``seed``) instead of TRL's
random sampler, and the collator lays out one document per prompt (``GroupByPrompt``). Each pair's loss is exactly the
loss of that pair fed alone, so on the same batch it equals stock ``DPOTrainer``'s; ``train_sampling_strategy`` is
ignored for a map-style training set.
"""

from __future__ import annotations

from trl_prefix_share.trainers.dpo.trainer import PrefixSharedDPOTrainer


class GroupedPrefixSharedDPOTrainer(PrefixSharedDPOTrainer):
    """[`PrefixSharedDPOTrainer`] with `group_by_prompt=True` whatever the config says: same constructor and config.

    Extra token savings grow with the number of pairs per prompt in a batch (K pairs over one prompt: the prompt once
    instead of K times, and a response shared by several pairs once).
    """

    _tag_names = ["trl", "dpo", "prefix-share", "group-by-prompt"]
    _always_group_by_prompt = True

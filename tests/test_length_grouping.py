"""Length-grouped batches: a seeded, shuffled permutation whose batches hold similar lengths; training on them equals
stock DPO fed the same batches (same pairs per batch, so the loss is normalised exactly as stock's)."""

from __future__ import annotations

import math

import pytest
from conftest import load_dataset_rows
from test_dpo_equivalence import dpo_args
from test_grouping import make
from trl import DPOConfig, DPOTrainer

from trl_prefix_share import PrefixSharedDPOConfig, PrefixSharedDPOTrainer
from trl_prefix_share.length_grouping import LengthGroupedBatchSampler, preference_lengths


def test_sampler_is_a_seeded_permutation_of_length_sorted_buckets():
    lengths = [(7 * i) % 101 for i in range(203)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=4, bucket_batches=5, seed=3)
    batches = sampler.batches(0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))  # every example once
    assert [len(b) for b in batches] == [4] * 50 + [3]  # full batches, the partial one last
    assert batches == sampler.batches(0) and batches != sampler.batches(1)  # seeded, new order each epoch
    assert list(sampler) == flat
    # Grouping: the spread of lengths inside a batch is far below a random batch's.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 25
    # Randomised: batch order is not sorted by length.
    firsts = [lengths[b[0]] for b in batches[:-1]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


class SameOrderDPOTrainer(DPOTrainer):
    """Stock DPO fed the length-grouped order, so a whole run sees the same batches as ours."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset or self.train_dataset
        return LengthGroupedBatchSampler(preference_lengths(dataset), self._train_batch_size, 2, self.args.seed)


def test_length_grouped_training_matches_stock_on_the_same_batches(model_dir, tokenizer):
    rows = load_dataset_rows("hh_helpful", 32)

    def args(cls=PrefixSharedDPOConfig, **extra):
        return dpo_args(
            cls, max_steps=4, logging_steps=1, learning_rate=5e-4, per_device_train_batch_size=4, max_length=96, **extra
        )

    stock = make(SameOrderDPOTrainer, model_dir("llama"), tokenizer, rows, args(DPOConfig))
    ours = make(
        PrefixSharedDPOTrainer,
        model_dir("llama"),
        tokenizer,
        rows,
        args(length_grouped_batches=True, length_bucket_batches=2),
    )
    assert isinstance(ours._get_train_sampler(), LengthGroupedBatchSampler)
    losses = []
    for trainer in (stock, ours):
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(losses[0]) == len(losses[1]) == 4
    for step, (actual, expected) in enumerate(zip(losses[1], losses[0], strict=True)):
        assert math.isclose(actual, expected, rel_tol=1e-4, abs_tol=1e-6), (step, actual, expected)


def test_length_grouping_and_prompt_grouping_are_exclusive(model_dir, tokenizer):
    with pytest.raises(ValueError, match="set only one of them"):
        PrefixSharedDPOTrainer(
            model=model_dir("llama"),
            args=dpo_args(PrefixSharedDPOConfig, length_grouped_batches=True, group_by_prompt=True),
            train_dataset=load_dataset_rows("hh_helpful", 4),
            processing_class=tokenizer,
        )

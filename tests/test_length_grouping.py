"""Length-grouped batches: a seeded, shuffled permutation whose batches hold similar lengths; training on them equals
stock DPO fed the same batches (same pairs per batch, so the loss is normalised exactly as stock's). Token-budget
batches: a variable number of pairs per batch, each pair weighted equally across micro-batches."""

from __future__ import annotations

import math

import pytest
from conftest import load_dataset_rows
from equivalence import relative_difference
from test_dpo_equivalence import dpo_args
from test_grouping import make
from trl import DPOConfig, DPOTrainer

from trl_prefix_share import PrefixSharedDPOConfig, PrefixSharedDPOTrainer
from trl_prefix_share.trainers.dpo.length_grouping import LengthGroupedBatchSampler, preference_lengths
from trl_prefix_share.trainers.dpo.token_budget import TokenBudgetBatchSampler


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


# -- token-budget batches ---------------------------------------------------------------------------------------------


def test_token_budget_batches_cover_the_data_within_budget():
    tokens = [(13 * i) % 97 + 3 for i in range(301)]
    one = TokenBudgetBatchSampler(tokens, tokens, max_batch_tokens=200, bucket_size=64, seed=1)
    batches = list(one)
    assert sorted(i for b in batches for i in b) == list(range(301))  # one process: every example once
    assert all(sum(tokens[i] for i in b) <= 200 or len(b) == 1 for b in batches)
    assert len({len(b) for b in batches}) > 3  # the number of pairs varies with their length
    one.set_epoch(1)
    assert len(list(one)) == len(one) == len(batches) and list(one) != batches  # same batches, new order
    ranks = [TokenBudgetBatchSampler(tokens, tokens, 200, 64, seed=1, num_replicas=2, rank=r) for r in range(2)]
    per_rank = [list(sampler) for sampler in ranks]
    assert len(per_rank[0]) == len(per_rank[1])  # ranks in lockstep
    assert all(len(a) == len(b) for a, b in zip(*per_rank, strict=True))  # equal pairs per step (TRL's gathers)
    assert all(sum(tokens[i] for i in b) <= 200 or len(b) == 1 for batches_of_rank in per_rank for b in batches_of_rank)
    seen = [i for batches_of_rank in per_rank for b in batches_of_rank for i in b]
    assert len(seen) == len(set(seen)) == 300  # 301 mod 2 = 1 example left out
    with pytest.raises(ValueError, match="cannot feed 400 processes"):
        TokenBudgetBatchSampler(tokens, tokens, 200, num_replicas=400)


class UnionBatchDPOTrainer(DPOTrainer):
    """Stock DPO trained on one batch made of the given examples."""

    indices: list[int] = []

    def _get_train_sampler(self, train_dataset=None):
        return list(self.indices)


def test_token_budget_step_equals_one_stock_batch_of_the_same_pairs(model_dir, tokenizer):
    """Two token-budget micro-batches of different sizes (gradient accumulation 2) make the same optimizer step as
    stock DPO on one batch holding all their pairs: every pair weighs the same."""
    rows = load_dataset_rows("hh_harmless", 24)

    def args(cls, **extra):
        return dpo_args(
            cls, max_steps=1, logging_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", **extra
        )

    ours = make(
        PrefixSharedDPOTrainer,
        model_dir("qwen2"),
        tokenizer,
        rows,
        args(PrefixSharedDPOConfig, max_batch_tokens=700, gradient_accumulation_steps=2),
    )
    sampler = ours._get_train_sampler()
    assert isinstance(sampler, TokenBudgetBatchSampler)
    first, second = list(sampler)[:2]
    assert len(first) != len(second)  # unequal micro-batches: equal weights per micro-batch would be wrong
    UnionBatchDPOTrainer.indices = first + second
    stock = make(
        UnionBatchDPOTrainer,
        model_dir("qwen2"),
        tokenizer,
        rows,
        args(DPOConfig, per_device_train_batch_size=len(first) + len(second)),
    )
    for trainer in (stock, ours):
        trainer.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (stock, ours)]
    assert math.isclose(losses[1][0], losses[0][0], rel_tol=1e-5), losses
    stock_params = dict(stock.model.named_parameters())
    compared = 0
    for name, param in ours.model.named_parameters():
        assert relative_difference(param, stock_params[name]) <= 1e-5, name
        compared += 1
    assert compared > 10


def test_length_options_refuse_a_streaming_dataset(model_dir, tokenizer):
    """No lengths up front: a clear error instead of silently ignoring the option."""
    trainer = PrefixSharedDPOTrainer(
        model=model_dir("llama"),
        args=dpo_args(PrefixSharedDPOConfig, max_batch_tokens=500),
        train_dataset=load_dataset_rows("hh_helpful", 4),
        processing_class=tokenizer,
    )
    streaming = trainer.train_dataset.to_iterable_dataset()
    with pytest.raises(ValueError, match="map-style"):
        trainer._get_train_sampler(streaming)

"""Pairs that share a prompt: one document per prompt (exact layout), a sampler that batches them together, and
GroupedPrefixSharedDPOTrainer vs stock trl.DPOTrainer on the same batches.

The expected documents are computed here (rows grouped by their prompt tokens) and checked with the independent
layout checker of test_layout.py; the trainer is compared with stock TRL on losses, gradients, metrics and each pair's
log-probabilities.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from conftest import DATA, DATASETS, load_dataset_rows
from equivalence import assert_equivalent, cpu_args, first_batch, perturb, relative_difference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_layout import PAD_ID, check_layout
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_prefix_share import PrefixSharedDPOConfig
from trl_prefix_share.core.layout import SequenceSpec, pack_documents
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions
from trl_prefix_share.core.preference.collator import PrefixSharedPreferenceCollator
from trl_prefix_share.trainers.dpo.grouped import GroupedPrefixSharedDPOTrainer
from trl_prefix_share.trainers.dpo.grouping import GroupByPrompt, PromptGroupedSampler, prompt_grouped_sampler

BATCH = 8

# -- documents ------------------------------------------------------------------------------------------------------


def grouped_by_prompt(batch: dict) -> list[list[tuple[list[int], int, int]]]:
    """Unpad the stock batch here and group rows whose prompt tokens are identical, in row order."""
    groups: dict[tuple[int, ...], list[tuple[list[int], int, int]]] = {}
    for row in range(batch["input_ids"].size(0)):
        length = int(batch["attention_mask"][row].sum())
        tokens = batch["input_ids"][row, :length].tolist()
        completion = batch["completion_mask"][row, :length].tolist()
        start = completion.index(1) if 1 in completion else length
        groups.setdefault(tuple(tokens[:start]), []).append((tokens, start, row))
    return list(groups.values())


def pandalm_examples(tokenizer, limit: int) -> list[dict]:
    """Tokenized PandaLM pairs in file order (several pairs per prompt, responses repeated across pairs)."""
    examples = []
    with open(DATA / DATASETS["pandalm"], encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            examples.append(
                {key + "_ids": tokenizer(row[key])["input_ids"] for key in ("prompt", "chosen", "rejected")}
            )
            if len(examples) == limit:
                break
    return examples


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_collator_groups_pairs_by_prompt_exactly(tokenizer, truncation_mode):
    examples = pandalm_examples(tokenizer, 12)
    stock = DataCollatorForPreference(
        pad_token_id=tokenizer.pad_token_id, max_length=96, truncation_mode=truncation_mode
    )
    collator = PrefixSharedPreferenceCollator(
        DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=96, truncation_mode=truncation_mode),
        pad_token_id=tokenizer.pad_token_id,
        options=PackingOptions(),
        group_documents=GroupByPrompt(),
    )
    ours, expected = collator(examples), stock(examples)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    documents = grouped_by_prompt(expected)
    assert any(len(doc) > 2 for doc in documents), "no prompt has several pairs: grouping would not be exercised"
    check_layout(ours[PACKED_KEY], documents, expected["input_ids"].size(1), pad_token_id=tokenizer.pad_token_id)
    pairs_only = PrefixSharedPreferenceCollator(stock, tokenizer.pad_token_id, PackingOptions())(examples)
    assert ours[PACKED_KEY]["input_ids"].numel() < pairs_only[PACKED_KEY]["input_ids"].numel()


PROMPTS = [[1, 2, 3, 4], [1, 2, 5], [6, 7], [8]]
RESPONSES = [[10], [11, 12], [13, 14, 15], [10, 16]]


@st.composite
def grouped_batches(draw):
    """Pairs over a few prompts (two of which share a prefix), with responses repeated across pairs."""
    pairs = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=7))
    chosen = [(PROMPTS[p] + RESPONSES[c], len(PROMPTS[p])) for p, c, _ in pairs]
    rejected = [(PROMPTS[p] + RESPONSES[r], len(PROMPTS[p])) for p, _, r in pairs]
    budget = draw(st.one_of(st.none(), st.integers(7, 30)))  # 7: the longest sequence fits alone
    return chosen + rejected, budget


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grouped_batches())
def test_grouped_layout_reproduces_every_sequence(case):
    sequences, budget = case
    specs = [SequenceSpec(torch.tensor(tokens), start, row) for row, (tokens, start) in enumerate(sequences)]
    documents = GroupByPrompt(budget)(specs, share_prefix=True)
    virtual_length = max(len(tokens) for tokens, _ in sequences)
    packed = pack_documents(documents, len(sequences), virtual_length, PAD_ID, max_row_tokens=budget, prefix_tree=True)
    expected = [
        [(seq.tokens.tolist(), seq.completion_start, seq.virtual_row) for seq in doc.sequences] for doc in documents
    ]
    # The grouping itself: every row once, one prompt per document, row order kept, each document within the budget.
    assert sorted(row for doc in expected for _, _, row in doc) == list(range(len(sequences)))
    for doc, spec in zip(expected, documents, strict=True):
        assert len({tuple(tokens[:start]) for tokens, start, _ in doc}) == 1
        assert [row for _, _, row in doc] == sorted(row for _, _, row in doc)
        if budget is not None:
            assert spec.num_tokens <= budget
    if budget is None:
        assert len(documents) == len({tuple(tokens[:start]) for tokens, start in sequences})
    check_layout(packed, expected, virtual_length, max_row_tokens=budget)


def test_share_prefix_off_keeps_plain_pairs():
    specs = [SequenceSpec(torch.tensor([1, 2, 3, 9 + row]), 3, row) for row in range(4)]
    documents = GroupByPrompt()(specs, share_prefix=False)
    assert [[seq.virtual_row for seq in doc.sequences] for doc in documents] == [[0, 2], [1, 3]]
    assert all(doc.shared_length == 0 for doc in documents)


# -- sampler --------------------------------------------------------------------------------------------------------


def intact_share(batches: list[list[int]], keys: list) -> float:
    """Share of prompts (with at most a batch of examples) whose examples all sit in one batch."""
    where: dict = {}
    for number, batch in enumerate(batches):
        for index in batch:
            where.setdefault(keys[index], set()).add(number)
    sizes = Counter(keys)
    eligible = [key for key in where if sizes[key] <= len(batches[0])]
    return sum(len(where[key]) == 1 for key in eligible) / len(eligible)


def test_sampler_is_a_seeded_shuffled_permutation_that_keeps_prompts_together():
    keys = [row["prompt"] for row in load_dataset_rows("pandalm", 400)]
    sampler = PromptGroupedSampler(keys, batch_size=BATCH, seed=3)
    assert len(sampler) == len(keys)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(keys)))
        batches = sampler.batches(epoch)
        assert all(len(batch) == BATCH for batch in batches[:-1])
        assert intact_share(batches, keys) >= 0.9
        orders.append(order)
    assert orders[0] != orders[1]
    assert list(PromptGroupedSampler(keys, batch_size=BATCH, seed=3)) == orders[0]
    assert list(PromptGroupedSampler(keys, batch_size=BATCH, seed=4)) != orders[0]
    # Random order would split most prompts.
    shuffled = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0)).tolist()
    assert intact_share([shuffled[i : i + BATCH] for i in range(0, len(keys), BATCH)], keys) < 0.5


def test_sampler_packs_groups_that_fit_exactly():
    keys = ["a"] * 4 + ["b"] * 4 + ["c"] * 2 + ["d"] * 2 + ["e", "f", "g", "h"] + ["i"] * 9
    for seed in range(5):
        batches = PromptGroupedSampler(keys, batch_size=4, seed=seed).batches(0)
        assert all(len(batch) == 4 for batch in batches[:-1]) and len(batches[-1]) == 1
        for key in "abcd":
            assert sum(any(keys[i] == key for i in batch) for batch in batches) == 1, (seed, key)


# -- trainer --------------------------------------------------------------------------------------------------------


def dpo_args(config_cls=DPOConfig, **overrides) -> DPOConfig:
    return cpu_args(config_cls, BATCH, **{**dict(max_length=128, beta=0.5), **overrides})


class SameOrderDPOTrainer(DPOTrainer):
    """Stock DPO fed the grouped order, so whole training runs see the same batches as the grouped trainer."""

    def _get_train_sampler(self, train_dataset=None):
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return prompt_grouped_sampler(train_dataset or self.train_dataset, self._train_batch_size, seed)


def make(cls, model_path, tokenizer, dataset, args):
    trainer = cls(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer)
    perturb(trainer.model)
    return trainer


def sequence_logps(trainer, batch: dict) -> torch.Tensor:
    """Each sequence's summed completion log-probability (stock forward, or ours when the batch is packed)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    extra = {PACKED_KEY: batch[PACKED_KEY]} if PACKED_KEY in batch else {}
    with torch.no_grad():
        out = trainer.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
            **extra,
        )
    return (out.log_probs * (labels[:, 1:] != -100)).sum(dim=1)


@pytest.fixture(scope="module")
def pandalm_rows():
    return load_dataset_rows("pandalm", 24)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_grouped_dpo_matches_stock_per_pair(family, model_dir, tokenizer, pandalm_rows):
    stock = make(DPOTrainer, model_dir(family), tokenizer, pandalm_rows, dpo_args())
    ours = make(GroupedPrefixSharedDPOTrainer, model_dir(family), tokenizer, pandalm_rows, dpo_args())
    stock_batch, our_batch = first_batch(stock, BATCH), first_batch(ours, BATCH)
    num_prompts = len({tuple(row) for row in ours.train_dataset[:BATCH]["prompt_ids"]})
    assert num_prompts < BATCH, "the batch must hold several pairs of one prompt"
    assert our_batch[PACKED_KEY]["document_ids"].max().item() + 1 == num_prompts
    stock_logps, our_logps = sequence_logps(stock, stock_batch), sequence_logps(ours, our_batch)
    assert relative_difference(our_logps, stock_logps) <= 1e-5
    assert (our_logps - stock_logps).abs().max() <= 1e-4 * stock_logps.abs().max()
    for loss_type in ("sigmoid", "ipo"):
        for trainer in (stock, ours):
            trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
        assert_equivalent(stock, ours, stock_batch, our_batch)


def test_grouped_dpo_row_budget_and_precompute_stay_exact(model_dir, tokenizer, pandalm_rows):
    def args():
        return dpo_args(PrefixSharedDPOConfig, max_row_tokens=300, precompute_ref_log_probs=True)

    stock = make(DPOTrainer, model_dir("llama"), tokenizer, pandalm_rows, dpo_args(precompute_ref_log_probs=True))
    ours = make(GroupedPrefixSharedDPOTrainer, model_dir("llama"), tokenizer, pandalm_rows, args())
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        expected = torch.tensor(stock.train_dataset[column])
        assert relative_difference(torch.tensor(ours.train_dataset[column]), expected) <= 1e-5
    our_batch = first_batch(ours, BATCH)
    assert our_batch[PACKED_KEY]["input_ids"].size(0) > 1
    assert_equivalent(stock, ours, first_batch(stock, BATCH), our_batch)


def test_grouped_training_matches_stock_on_the_same_batches(model_dir, tokenizer):
    """`train()` (gradient checkpointing on, TRL's default): the grouped sampler batches pairs of one prompt
    together, and the loss curve equals stock DPO fed the same order."""
    rows = load_dataset_rows("pandalm", 40, offset=100)

    def args():
        return dpo_args(max_steps=4, logging_steps=1, learning_rate=5e-4, per_device_train_batch_size=4, max_length=96)

    stock = make(SameOrderDPOTrainer, model_dir("qwen2"), tokenizer, rows, args())
    ours = make(GroupedPrefixSharedDPOTrainer, model_dir("qwen2"), tokenizer, rows, args())
    losses = []
    for trainer in (stock, ours):
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(losses[0]) == len(losses[1]) == 4
    for step, (a, e) in enumerate(zip(losses[1], losses[0], strict=True)):
        assert math.isclose(a, e, rel_tol=1e-4, abs_tol=1e-6), (step, a, e)
    ratio = ours.prefix_share_totals["stock_tokens"] / ours.prefix_share_totals["tokens"]
    assert ratio > 2


def test_grouped_batches_use_fewer_tokens_than_pairs(model_dir, tokenizer, pandalm_rows):
    grouped = GroupedPrefixSharedDPOTrainer(
        model=model_dir("llama"), args=dpo_args(), train_dataset=pandalm_rows, processing_class=tokenizer
    )
    sampler = grouped._get_train_sampler()
    assert isinstance(sampler, PromptGroupedSampler)
    batches = list(grouped.get_train_dataloader())
    examples = [grouped.train_dataset[i] for i in range(len(grouped.train_dataset))]
    base = grouped.data_collator.base_collator
    pairs = PrefixSharedPreferenceCollator(base, tokenizer.pad_token_id, PackingOptions(prefix_tree=False))
    pair_trees = PrefixSharedPreferenceCollator(base, tokenizer.pad_token_id, PackingOptions())
    pair_tokens = tree_tokens = 0
    for batch, indices in zip(batches, sampler.batches(0), strict=True):  # the dataloader follows the sampler
        chosen = [examples[i] for i in indices]
        stock_view = pairs(chosen)
        assert torch.equal(batch["input_ids"], stock_view["input_ids"])
        pair_tokens += stock_view[PACKED_KEY]["input_ids"].numel()
        tree_tokens += pair_trees(chosen)[PACKED_KEY]["input_ids"].numel()
    grouped_tokens = sum(batch[PACKED_KEY]["input_ids"].numel() for batch in batches)
    # Against one document per pair, grouping saves most; a prefix tree of the same pairs merges their common prompt
    # by itself, and grouping adds only what it dedupes (identical responses of one prompt scored once).
    assert grouped_tokens < 0.7 * pair_tokens
    assert grouped_tokens <= tree_tokens < pair_tokens


def test_config_flag_turns_grouping_on_in_the_plain_trainer(model_dir, tokenizer):
    from datasets import Dataset
    from test_dpo_equivalence import dpo_args

    from trl_prefix_share import PrefixSharedDPOConfig, PrefixSharedDPOTrainer

    rows = Dataset.from_list(
        [
            {"prompt": f"Question {i % 2}: name a colour.", "chosen": f" Blue {i}.", "rejected": f" Car {i}."}
            for i in range(8)
        ]
    )
    trainer = PrefixSharedDPOTrainer(
        model=model_dir("llama"),
        args=dpo_args(PrefixSharedDPOConfig, group_by_prompt=True),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    assert isinstance(trainer.data_collator.group_documents, GroupByPrompt)
    assert isinstance(trainer._get_train_sampler(), PromptGroupedSampler)
    batch = next(iter(trainer.get_train_dataloader()))
    prompts = batch["prefix_share"]["document_ids"]
    assert int(prompts.max()) + 1 < batch["input_ids"].size(0) // 2  # fewer documents than pairs: prompts merged

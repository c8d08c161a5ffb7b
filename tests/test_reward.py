"""PrefixSharedRewardTrainer vs stock trl.RewardTrainer on the same batches: loss, gradients and logged metrics.

Pairs: both trainers collate the same examples. Ranked lists: our batch of K-response examples is compared with
stock TRL given the binarized pairs of those examples (``binarize_ranked``) as one batch. Tiny Llama and Qwen2
sequence-classification models; all weights are moved by the same seeded noise in both trainers so that rewards,
margins and accuracies are non-trivial.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import conversational, load_dataset_rows, read_jsonl
from datasets import Dataset
from equivalence import (
    assert_equivalent,
    cpu_args,
    first_batch,
    loss_and_grads,
    perturb,
    relative_difference,
    tree_depth,
    trees_on_short_heads,
)
from transformers import AutoConfig, AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from trl_prefix_share.core.model_support import UnsupportedModelError
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions
from trl_prefix_share.core.reward.collator import SCORE_INDEX_KEY, PrefixSharedRewardCollator, read_out_positions
from trl_prefix_share.core.reward.scores import score_head
from trl_prefix_share.trainers.reward.config import PrefixSharedRewardConfig
from trl_prefix_share.trainers.reward.ranked import binarize_ranked, ranked_from_pairs, ranked_pairs
from trl_prefix_share.trainers.reward.trainer import PrefixSharedRewardTrainer

BATCH = 4


def reward_args(config_cls=RewardConfig, **overrides) -> RewardConfig:
    return cpu_args(config_cls, BATCH, **{**dict(max_length=512), **overrides})


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    """Factory: path of a saved tiny sequence-classification model of a family (built once per module)."""
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            config = AutoConfig.for_model(
                family,
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                num_labels=1,
                pad_token_id=tokenizer.pad_token_id,
            )
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(f"tiny-rm-{family}")
            AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[family] = str(path)
        return cache[family]

    return get


def make_trainer(cls, model_path, tokenizer, dataset, args=None, perturb_only=None, **kwargs):
    trainer = cls(
        model=model_path, args=args or reward_args(), train_dataset=dataset, processing_class=tokenizer, **kwargs
    )
    perturb(trainer.model, only=perturb_only)
    return trainer


def make_pair(model_path, tokenizer, dataset, args_factory=reward_args, **kwargs):
    stock = make_trainer(RewardTrainer, model_path, tokenizer, dataset, args_factory(), **kwargs)
    ours = make_trainer(PrefixSharedRewardTrainer, model_path, tokenizer, dataset, args_factory(), **kwargs)
    return stock, ours


def compare_first_batch(stock, ours, size: int = BATCH, mode: str = "train") -> None:
    assert_equivalent(stock, ours, first_batch(stock, size), first_batch(ours, size), mode=mode)


@pytest.fixture(scope="module")
def hh_rows():
    return load_dataset_rows("hh_harmless", 12)


# -- pairs ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pairs_match_stock_with_center_rewards(family, reward_model_dir, tokenizer, hh_rows):
    stock, ours = make_pair(reward_model_dir(family), tokenizer, hh_rows)
    trees_on_short_heads(ours)
    stock_batch, our_batch = first_batch(stock, BATCH), first_batch(ours, BATCH)
    packed = our_batch[PACKED_KEY]
    assert packed["input_ids"].numel() < stock_batch["input_ids"].numel()
    assert tree_depth(packed) >= 2  # hh's prompts merged below their common "\n\nHuman:"
    for coefficient in (None, 0.01):
        for trainer in (stock, ours):
            trainer.args.center_rewards_coefficient = coefficient
        assert_equivalent(stock, ours, stock_batch, our_batch)


def test_margin_column(reward_model_dir, tokenizer, hh_rows):
    rows = hh_rows.add_column("margin", [0.1 * i - 0.3 for i in range(len(hh_rows))])
    stock, ours = make_pair(reward_model_dir("qwen2"), tokenizer, rows)
    compare_first_batch(stock, ours)


@pytest.mark.parametrize("dataset_name", ["ultrafeedback", "pandalm"])
def test_explicit_prompt_and_conversational_data(dataset_name, reward_model_dir, tokenizer):
    rows = load_dataset_rows(dataset_name, 8)
    for data in (rows, conversational(rows)):
        stock, ours = make_pair(reward_model_dir("llama"), tokenizer, data)
        compare_first_batch(stock, ours)


def test_peft_lora_sequence_classification(reward_model_dir, tokenizer, hh_rows):
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="SEQ_CLS")

    stock = make_trainer(RewardTrainer, reward_model_dir("llama"), tokenizer, hh_rows, peft_config=lora())
    ours = make_trainer(PrefixSharedRewardTrainer, reward_model_dir("llama"), tokenizer, hh_rows, peft_config=lora())
    compare_first_batch(stock, ours)
    _, grads, _ = loss_and_grads(ours, first_batch(ours, BATCH))
    assert any("score" in name for name in grads), "the score head must be trained (modules_to_save)"
    assert any("lora_A" in name for name in grads)


def test_evaluate_metrics_match(reward_model_dir, tokenizer):
    train, held_out = load_dataset_rows("hh_helpful", 8), load_dataset_rows("hh_helpful", 8, offset=100)
    stock, ours = make_pair(reward_model_dir("qwen2"), tokenizer, train)
    stock_metrics, our_metrics = stock.evaluate(held_out), ours.evaluate(held_out)
    compared = 0
    for key, expected in stock_metrics.items():
        if key.endswith(("runtime", "samples_per_second", "steps_per_second", "preparation_time")):
            continue
        assert math.isclose(our_metrics[key], expected, rel_tol=1e-4, abs_tol=1e-5), (key, our_metrics[key], expected)
        compared += 1
    assert compared >= 5 and "eval_prefix_share/token_ratio" in our_metrics


def test_share_prefix_off_and_multiple_rows_stay_exact(reward_model_dir, tokenizer, hh_rows):
    for options in (dict(share_prefix=False), dict(max_row_tokens=500), dict(pack_documents=False)):
        stock, ours = make_pair(
            reward_model_dir("llama"),
            tokenizer,
            hh_rows,
            args_factory=lambda o=options: reward_args(PrefixSharedRewardConfig, **o),
        )
        batch = first_batch(ours, BATCH)
        if "max_row_tokens" in options:
            assert batch[PACKED_KEY]["input_ids"].size(0) > 1
        if "pack_documents" in options:  # one document (pair) per row
            assert batch[PACKED_KEY]["input_ids"].size(0) == batch["input_ids"].size(0) // 2
        assert_equivalent(stock, ours, first_batch(stock, BATCH), batch)


def test_scores_read_where_stock_reads_them(reward_model_dir, tokenizer):
    """Sequences whose own tokens include the pad id are scored at the last non-pad token, as transformers does;
    including a read-out inside the common prefix, identical chosen and rejected, and a lone token."""
    pad = tokenizer.pad_token_id
    rows = Dataset.from_list(
        [
            {"chosen_ids": [5, 6, 7, 8, pad], "rejected_ids": [5, 6, 7, 9, 10]},
            {"chosen_ids": [11, 12, 13, pad, pad], "rejected_ids": [11, 12, 13, pad, 14, pad]},  # chosen read at 13
            {"chosen_ids": [15, pad, 16, 17], "rejected_ids": [15, pad, 16, 17]},  # identical
            {"chosen_ids": [18, 19, 20], "rejected_ids": [pad]},  # stock reads position 0 of an all-pad row
        ]
    )
    stock, ours = make_pair(reward_model_dir("llama"), tokenizer, rows)
    our_batch = first_batch(ours, 4)
    packed = our_batch[PACKED_KEY]
    read_out = read_out_positions(our_batch["input_ids"], pad)
    flat_ids, flat_pos = packed["input_ids"].reshape(-1), packed["position_ids"].reshape(-1)
    rows_index = torch.arange(our_batch["input_ids"].size(0))
    assert torch.equal(flat_ids[packed[SCORE_INDEX_KEY]], our_batch["input_ids"][rows_index, read_out])
    assert torch.equal(flat_pos[packed[SCORE_INDEX_KEY]], read_out)
    assert read_out[1].item() == 2 and read_out[7].item() == 0
    assert_equivalent(stock, ours, first_batch(stock, 4), our_batch)
    logits = ours.model(**{k: v for k, v in our_batch.items()}).logits.squeeze(-1)
    assert logits[2].item() == logits[6].item()  # identical sequences: one branch, bit-identical rewards


def test_collator_refuses_a_foreign_pad_token():
    collator = PrefixSharedRewardCollator(DataCollatorForPreference(pad_token_id=0), 99, PackingOptions())
    with pytest.raises(ValueError, match="padded with a token other than"):
        collator([{"chosen_ids": [1, 2, 3], "rejected_ids": [4]}])


def test_causal_lm_is_refused_with_an_explanation(model_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(UnsupportedModelError, match="score"):
        score_head(AutoModelForCausalLM.from_pretrained(model_dir("llama")))


def _train_losses(trainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_training_curve_matches_stock(reward_model_dir, tokenizer):
    """`train()` with TRL's defaults (gradient checkpointing on), 6 steps: the loss curves agree step by step."""
    rows = load_dataset_rows("hh_harmless", 24)

    def args():
        return reward_args(max_steps=6, logging_steps=1, learning_rate=1e-3, per_device_train_batch_size=2)

    stock, ours = make_pair(reward_model_dir("qwen2"), tokenizer, rows, args_factory=args)
    assert ours.args.gradient_checkpointing
    stock_losses, our_losses = _train_losses(stock), _train_losses(ours)
    assert len(stock_losses) == len(our_losses) == 6
    assert max(stock_losses) - min(stock_losses) > 1e-3
    for step, (a, e) in enumerate(zip(our_losses, stock_losses, strict=True)):
        assert math.isclose(a, e, rel_tol=1e-4, abs_tol=1e-6), (step, a, e)
    assert ours.prefix_share_totals["stock_tokens"] > ours.prefix_share_totals["tokens"] > 0


# -- ranked lists ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranked_rows():
    """PandaLM: several pairwise comparisons per prompt, turned into ranked lists (wins order, ties allowed)."""
    examples = [e for e in ranked_from_pairs(read_jsonl("pandalm", 120)) if len(e["responses"]) >= 3]
    assert len(examples) >= 6
    return examples


def binarized(examples: list[dict]) -> Dataset:
    return Dataset.from_list([pair for example in examples for pair in binarize_ranked(example)])


def ranked_pair(model_path, tokenizer, examples, size, args_factory=reward_args):
    """(stock on the binarized pairs, ours on the ranked lists), and the first batch of each covering the same
    pairs."""
    stock = make_trainer(RewardTrainer, model_path, tokenizer, binarized(examples[:size]), args_factory())
    ours = make_trainer(
        PrefixSharedRewardTrainer, model_path, tokenizer, Dataset.from_list(examples[:size]), args_factory()
    )
    return stock, ours, first_batch(stock, len(stock.train_dataset)), first_batch(ours, len(ours.train_dataset))


def test_ranked_pairs_order_and_ties():
    assert ranked_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert ranked_pairs(4, [2, 1, 2, 3]) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]
    assert ranked_pairs(2, [1, 1]) == []


def pair_losses(trainer, batch: dict) -> torch.Tensor:
    """Per-pair Bradley-Terry losses of a reward batch (``[chosen rows; rejected rows]``), from the model's scores."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", PACKED_KEY) if key in batch}
    with torch.no_grad():
        chosen, rejected = trainer.model(**inputs, use_cache=False).logits.squeeze(-1).chunk(2)
    return -torch.nn.functional.logsigmoid(chosen - rejected)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ranked_list_matches_binarized_stock(family, reward_model_dir, tokenizer, ranked_rows):
    best_first = [{k: v for k, v in e.items() if k != "ranks"} for e in ranked_rows]  # all K(K-1)/2 pairs
    stock, ours, stock_batch, our_batch = ranked_pair(reward_model_dir(family), tokenizer, best_first, 3)
    assert stock_batch["input_ids"].size(0) == our_batch["input_ids"].size(0) > 2 * 3
    assert relative_difference(pair_losses(ours, our_batch), pair_losses(stock, stock_batch)) <= 1e-5
    for coefficient in (None, 0.01):
        for trainer in (stock, ours):
            trainer.args.center_rewards_coefficient = coefficient
        assert_equivalent(stock, ours, stock_batch, our_batch)
    # Each distinct response is one branch: far fewer tokens than the binarized pairs.
    assert our_batch[PACKED_KEY]["input_ids"].numel() * 3 < stock_batch["attention_mask"].sum()


def test_ranked_ties_conversational_and_length_filter(reward_model_dir, tokenizer, ranked_rows):
    chat = [
        {
            "prompt": [{"role": "user", "content": e["prompt"]}],
            "responses": [[{"role": "assistant", "content": r}] for r in e["responses"]],
            "ranks": e["ranks"],
        }
        for e in ranked_rows
    ]
    lengths = sorted(len(tokenizer(e["prompt"] + r)["input_ids"]) for e in ranked_rows[:4] for r in e["responses"])
    max_length = lengths[len(lengths) // 2]  # drops some responses: stock drops every pair that contains one

    for data in (ranked_rows, chat):
        stock, ours, stock_batch, our_batch = ranked_pair(
            reward_model_dir("llama"), tokenizer, data, 4, lambda: reward_args(max_length=max_length)
        )
        assert stock_batch["input_ids"].size(0) == our_batch["input_ids"].size(0)
        assert_equivalent(stock, ours, stock_batch, our_batch)


def test_ranked_training_runs(reward_model_dir, tokenizer, ranked_rows):
    args = reward_args(max_steps=3, logging_steps=1, per_device_train_batch_size=2, learning_rate=1e-3)
    trainer = PrefixSharedRewardTrainer(
        model=reward_model_dir("qwen2"),
        args=args,
        train_dataset=Dataset.from_list(ranked_rows),
        processing_class=tokenizer,
    )
    losses = _train_losses(trainer)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    ratio = trainer.prefix_share_totals["stock_tokens"] / trainer.prefix_share_totals["tokens"]
    assert ratio > 2

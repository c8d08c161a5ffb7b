"""Bad input: a clear error naming the example and the fix, or a documented exact fallback; never a NaN loss."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_tiny_model, load_dataset_rows
from datasets import Dataset
from equivalence import assert_equivalent, cpu_args, first_batch, loss_and_grads
from test_dpo_equivalence import BATCH, dpo_args, make_pair
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_prefix_share import PrefixSharedDPOConfig, PrefixSharedDPOTrainer, UnsupportedModelError
from trl_prefix_share.core.packing import PackingOptions
from trl_prefix_share.core.preference.collator import PrefixSharedPreferenceCollator
from trl_prefix_share.trainers.dpo.validation import validate_preference_dataset


def tokenized(rows: list[tuple[list[int], list[int], list[int]]]) -> Dataset:
    return Dataset.from_list([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in rows])


def test_empty_response_is_named_with_the_fix():
    data = tokenized([([1, 2, 3], [4], [5]), ([1, 2], [], [6, 7]), ([9, 9], [3], [])])
    with pytest.raises(ValueError, match=r"example\(s\) 1, 2 of the train dataset have an empty") as error:
        validate_preference_dataset(data, "train", 64, "keep_start", None, drop_invalid=False)
    assert "drop_invalid_examples=True" in str(error.value)


def test_empty_response_dropped_on_request(caplog):
    data = tokenized([([1, 2, 3], [4], [5]), ([1, 2], [], [6, 7])])
    with caplog.at_level(logging.WARNING):
        kept = validate_preference_dataset(data, "train", 64, "keep_start", None, drop_invalid=True)
    assert len(kept) == 1 and kept[0]["chosen_ids"] == [4]
    assert "Dropping 1 example(s)" in caplog.text


def test_row_budget_smaller_than_a_document(model_dir, tokenizer):
    rows = load_dataset_rows("pandalm", 8)

    def build(drop: bool):
        args = dpo_args(PrefixSharedDPOConfig, max_row_tokens=110, max_length=128, drop_invalid_examples=drop)
        return PrefixSharedDPOTrainer(
            model=model_dir("llama"), args=args, train_dataset=rows, processing_class=tokenizer
        )

    with pytest.raises(ValueError, match=r"more than `max_row_tokens=110`. Raise `max_row_tokens` to at least"):
        build(drop=False)
    trainer = build(drop=True)
    assert 0 < len(trainer.train_dataset) < len(rows)
    loss, _, _ = loss_and_grads(trainer, first_batch(trainer, min(BATCH, len(trainer.train_dataset))))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "rows",
    [
        # identical responses: exact (no signal), finite loss
        [
            {"prompt": f"Question {i}: {i} plus {i}?", "chosen": f" It is {i + i}.", "rejected": f" It is {i + i}."}
            for i in range(4)
        ],
        # prompts that end mid-word: the tokenizer merges across the boundary, so the prompt is not a token prefix
        [
            {"prompt": f"Please complete the wor{'d' * i}", "chosen": "ds of the song", "rejected": "k you did"}
            for i in range(4)
        ],
        # empty prompts: nothing to share, laid out unshared
        [{"prompt": "", "chosen": f"Answer {i} is fine.", "rejected": f"Answer {i + 1} is not."} for i in range(4)],
    ],
    ids=["identical-responses", "prompt-not-token-prefix", "empty-prompt"],
)
def test_awkward_pairs_stay_exact(rows, model_dir, tokenizer):
    stock, ours = make_pair(model_dir("llama"), tokenizer, Dataset.from_list(rows))
    # With identical responses the DPO gradient is exactly zero (both sides are rounding noise); the SFT term keeps
    # a real gradient to compare.
    for trainer in (stock, ours):
        trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, 1.0]
    assert_equivalent(stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))


def test_left_padded_batches_are_refused():
    def left_padded(examples):
        batch = DataCollatorForPreference(pad_token_id=0)(examples)
        return {key: value.flip(1) for key, value in batch.items()}

    collator = PrefixSharedPreferenceCollator(left_padded, pad_token_id=0, options=PackingOptions())
    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5, 6]}] * 2
    with pytest.raises(ValueError, match="left-padded"):
        collator(examples)


def test_unserved_model_falls_back_or_raises_at_construction(tokenizer, tmp_path):
    """A model the structural check refuses (Jamba: its Mamba1 scan cannot start from a branch's state): the default
    trains like stock with one warning; the error mode raises before any training."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trl_prefix_share.core.installer import PrefixShareFallbackWarning

    config = AutoConfig.for_model(
        "jamba",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=4,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.warns(PrefixShareFallbackWarning, match="carry a state"):
        trainer = PrefixSharedDPOTrainer(
            model=str(tmp_path),
            args=dpo_args(),
            train_dataset=load_dataset_rows("pandalm", 4),
            processing_class=tokenizer,
        )
    assert "carry a state" in trainer.prefix_share_fallback
    with pytest.raises(UnsupportedModelError, match="carry a state"):
        PrefixSharedDPOTrainer(
            model=str(tmp_path),
            args=dpo_args(PrefixSharedDPOConfig, on_unsupported_model="error"),
            train_dataset=load_dataset_rows("pandalm", 4),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("kind", ["dpo", "orpo", "reward"])
def test_prompt_learning_peft_is_refused(tokenizer, kind):
    """Every trainer refuses a prompt-learning adapter before TRL builds anything (its virtual tokens cannot be laid
    out), with the fix in the message."""
    from peft import PromptTuningConfig
    from trl import RewardConfig
    from trl.experimental.orpo import ORPOConfig

    from trl_prefix_share import PrefixSharedORPOTrainer, PrefixSharedRewardTrainer

    trainer_cls, args, task = {
        "dpo": (PrefixSharedDPOTrainer, dpo_args(), "CAUSAL_LM"),
        "orpo": (PrefixSharedORPOTrainer, cpu_args(ORPOConfig, BATCH), "CAUSAL_LM"),
        "reward": (PrefixSharedRewardTrainer, cpu_args(RewardConfig, BATCH), "SEQ_CLS"),
    }[kind]
    model = build_tiny_model("llama", len(tokenizer))
    with pytest.raises(ValueError, match="Prompt-learning PEFT.*Use a LoRA-style adapter"):
        trainer_cls(
            model=model,
            args=args,
            train_dataset=load_dataset_rows("pandalm", 4),
            processing_class=tokenizer,
            peft_config=PromptTuningConfig(num_virtual_tokens=4, task_type=task),
        )


def test_model_to_patch_unwraps_lora_and_refuses_a_wrapped_prompt_learning_model(tokenizer):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    from trl_prefix_share.core.installer import model_to_patch

    base = build_tiny_model("llama", len(tokenizer))
    assert model_to_patch(base) is base
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert model_to_patch(lora) is lora.get_base_model() and model_to_patch(lora) is not lora
    prompt_tuned = get_peft_model(
        build_tiny_model("llama", len(tokenizer)), PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    with pytest.raises(ValueError, match="Prompt-learning PEFT"):
        model_to_patch(prompt_tuned)

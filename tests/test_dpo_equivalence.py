"""PrefixSharedDPOTrainer vs stock trl.DPOTrainer on the same batches: loss, gradients and logged metrics.

Real data from ../shared/data, the shared tokenizer, tiny models of several families. Before comparing, the policy is
moved away from the reference by the same seeded noise in both trainers, so log-ratios, rewards and every loss type
are non-trivial (at initialisation policy == reference and many losses are constant).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import conversational, load_dataset_rows, tiny_moe_config
from equivalence import (
    assert_equivalent,
    build_pair,
    cpu_args,
    first_batch,
    loss_and_grads,
    perturb,
    relative_difference,
)
from trl import DPOConfig, DPOTrainer

from trl_prefix_share import PrefixSharedDPOConfig, PrefixSharedDPOTrainer
from trl_prefix_share.core.packing import PACKED_KEY

ALL_LOSS_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
BATCH = 4


def dpo_args(config_cls=DPOConfig, **overrides) -> DPOConfig:
    return cpu_args(config_cls, BATCH, **{**dict(max_length=192, beta=0.5), **overrides})


def make_pair(model_path, tokenizer, dataset, args_factory=dpo_args, perturb_only=None, **trainer_kwargs):
    def make(cls):
        trainer = cls(
            model=model_path, args=args_factory(), train_dataset=dataset, processing_class=tokenizer, **trainer_kwargs
        )
        perturb(trainer.model, only=perturb_only)
        return trainer

    return build_pair(make)


@pytest.fixture(scope="module")
def hh_rows():
    return load_dataset_rows("hh_harmless", 12)


#: Every loss type on Llama; on Qwen2 a subset that covers each kind of loss math (log-sigmoid, squared, smoothed,
#: BCO's running reward mean, SPPO's targets, DiscoPOP's mix), to keep the float64 suite inside CI's time budget.
SECOND_FAMILY_LOSS_TYPES = ["sigmoid", "ipo", "robust", "bco_pair", "sppo_hard", "discopop"]


@pytest.fixture(scope="module")
def loss_type_pairs(model_dir, tokenizer, hh_rows):
    """Factory: (stock, ours, stock batch, our batch) of a family, built once per module (and per test worker)."""
    cache: dict[str, tuple] = {}

    def get(family: str) -> tuple:
        if family not in cache:
            stock, ours = make_pair(model_dir(family), tokenizer, hh_rows)
            cache[family] = (stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))
        return cache[family]

    return get


@pytest.mark.parametrize(
    ("family", "loss_type"),
    [("llama", t) for t in ALL_LOSS_TYPES] + [("qwen2", t) for t in SECOND_FAMILY_LOSS_TYPES],
)
def test_every_loss_type_matches_stock(family, loss_type, loss_type_pairs):
    stock, ours, stock_batch, our_batch = loss_type_pairs(family)
    smoothing = 0.1 if loss_type in {"exo_pair", "robust", "aot", "aot_unpaired"} else 0.0
    for trainer in (stock, ours):
        trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss_type], [1.0], smoothing
    assert_equivalent(stock, ours, stock_batch, our_batch)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_more_families_sigmoid_and_ipo(family, model_dir, tokenizer, hh_rows):
    stock, ours = make_pair(model_dir(family), tokenizer, hh_rows)
    stock_batch, our_batch = first_batch(stock, BATCH), first_batch(ours, BATCH)
    for loss_type in ("sigmoid", "ipo"):
        for trainer in (stock, ours):
            trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
        assert_equivalent(stock, ours, stock_batch, our_batch)


def test_loss_weight_mix_and_divergences(model_dir, tokenizer, hh_rows):
    stock, ours = make_pair(model_dir("llama"), tokenizer, hh_rows)
    stock_batch, our_batch = first_batch(stock, BATCH), first_batch(ours, BATCH)
    for trainer in (stock, ours):
        trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft", "ipo"], [1.0, 0.5, 0.2]
    assert_equivalent(stock, ours, stock_batch, our_batch)
    for divergence in ("forward_kl", "js_divergence", "alpha_divergence"):
        for trainer in (stock, ours):
            trainer.loss_types, trainer.loss_weights, trainer.f_divergence_type = ["sigmoid"], [1.0], divergence
        assert_equivalent(stock, ours, stock_batch, our_batch)
    for trainer in (stock, ours):
        trainer.f_divergence_type, trainer.ld_alpha = "reverse_kl", 0.5
    assert_equivalent(stock, ours, stock_batch, our_batch)


def test_wpo_weighting(model_dir, tokenizer, hh_rows):
    stock, ours = make_pair(model_dir("qwen2"), tokenizer, hh_rows, args_factory=lambda: dpo_args(use_weighting=True))
    assert_equivalent(stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))


@pytest.mark.parametrize("dataset_name", ["ultrafeedback", "pandalm"])
def test_explicit_prompt_and_conversational_data(dataset_name, model_dir, tokenizer):
    rows = load_dataset_rows(dataset_name, 8)
    for data in (rows, conversational(rows)):
        stock, ours = make_pair(model_dir("llama"), tokenizer, data)
        assert_equivalent(stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))


def test_explicit_ref_model(model_dir, tokenizer, hh_rows):
    from transformers import AutoModelForCausalLM

    def make(cls):
        ref = AutoModelForCausalLM.from_pretrained(model_dir("qwen2"))
        perturb(ref, seed=7)
        trainer = cls(
            model=model_dir("qwen2"), ref_model=ref, args=dpo_args(), train_dataset=hh_rows, processing_class=tokenizer
        )
        return trainer

    stock, ours = build_pair(make)
    assert_equivalent(stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))


def test_precomputed_reference_log_probs(model_dir, tokenizer, hh_rows):
    stock, ours = make_pair(
        model_dir("llama"), tokenizer, hh_rows, args_factory=lambda: dpo_args(precompute_ref_log_probs=True)
    )
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        expected = torch.tensor(stock.train_dataset[column])
        assert relative_difference(torch.tensor(ours.train_dataset[column]), expected) <= 1e-5
    assert_equivalent(stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))


def test_peft_lora_new_adapter(model_dir, tokenizer, hh_rows):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    stock, ours = make_pair(model_dir("llama"), tokenizer, hh_rows, perturb_only="lora_B", peft_config=lora)
    assert ours.ref_model is None  # the reference is the adapter-disabled model
    assert_equivalent(stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))


def test_peft_pretrained_adapter_uses_ref_copy(model_dir, tokenizer, hh_rows):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def make(cls):
        base = AutoModelForCausalLM.from_pretrained(model_dir("qwen2"))
        torch.manual_seed(0)  # LoRA's A matrices start random: the same start for both trainers
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        perturb(model, only="lora_", seed=3)  # a "pretrained" adapter
        trainer = cls(model=model, args=dpo_args(), train_dataset=hh_rows, processing_class=tokenizer)
        perturb(trainer.model, only="lora_B", seed=4)  # then the policy moves away from its "ref" copy
        return trainer

    stock, ours = build_pair(make)
    assert "ref" in ours.model.peft_config
    assert_equivalent(stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))


def test_evaluate_metrics_match(model_dir, tokenizer):
    train, held_out = load_dataset_rows("hh_helpful", 8), load_dataset_rows("hh_helpful", 8, offset=100)
    stock, ours = make_pair(model_dir("llama"), tokenizer, train)
    stock_metrics = stock.evaluate(held_out)
    our_metrics = ours.evaluate(held_out)
    compared = 0
    for key, expected in stock_metrics.items():
        if key.endswith(("runtime", "samples_per_second", "steps_per_second")):
            continue
        assert math.isclose(our_metrics[key], expected, rel_tol=1e-4, abs_tol=1e-5), (key, our_metrics[key], expected)
        compared += 1
    assert compared >= 10 and "eval_prefix_share/token_ratio" in our_metrics


def test_share_prefix_off_and_multiple_rows_stay_exact(model_dir, tokenizer, hh_rows):
    for options in (dict(share_prefix=False), dict(max_row_tokens=400), dict(pack_documents=False)):
        stock, ours = make_pair(
            model_dir("llama"), tokenizer, hh_rows, args_factory=lambda o=options: dpo_args(PrefixSharedDPOConfig, **o)
        )
        batch = first_batch(ours, BATCH)
        if "max_row_tokens" in options:
            assert batch["prefix_share"]["input_ids"].size(0) > 1
        if "pack_documents" in options:  # one document (pair) per row
            assert batch["prefix_share"]["input_ids"].size(0) == batch["input_ids"].size(0) // 2
        assert_equivalent(stock, ours, first_batch(stock, BATCH), batch)


def test_keep_end_truncation_falls_back_to_unshared_exactly(model_dir, tokenizer):
    rows = load_dataset_rows("ultrafeedback", 8)
    stock, ours = make_pair(
        model_dir("qwen2"), tokenizer, rows, args_factory=lambda: dpo_args(max_length=64, truncation_mode="keep_end")
    )
    assert_equivalent(stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))


def test_same_data_order_as_stock(model_dir, tokenizer, hh_rows):
    stock, ours = make_pair(model_dir("llama"), tokenizer, hh_rows)
    for stock_batch, our_batch in zip(stock.get_train_dataloader(), ours.get_train_dataloader(), strict=True):
        assert torch.equal(stock_batch["input_ids"], our_batch["input_ids"])


def _train_losses(trainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_twenty_step_training_curve(model_dir, tokenizer):
    """`train()` with TRL's defaults (gradient checkpointing on): the loss curves agree step by step."""
    rows = load_dataset_rows("hh_harmless", 40)

    def args():
        return dpo_args(max_steps=20, logging_steps=1, learning_rate=5e-4, per_device_train_batch_size=2)

    def make(cls):
        return cls(model=model_dir("llama"), args=args(), train_dataset=rows, processing_class=tokenizer)

    stock, ours = build_pair(make)
    assert ours.args.gradient_checkpointing
    stock_losses, our_losses = _train_losses(stock), _train_losses(ours)
    assert len(stock_losses) == len(our_losses) == 20
    assert max(stock_losses) - min(stock_losses) > 1e-3  # the curve moves: the comparison is not of constants
    for step, (a, e) in enumerate(zip(our_losses, stock_losses, strict=True)):
        assert math.isclose(a, e, rel_tol=1e-3, abs_tol=1e-5), (step, a, e)
    assert ours.prefix_share_totals["stock_tokens"] > ours.prefix_share_totals["tokens"] > 0


@pytest.mark.slow
def test_gradient_accumulation_and_sync_ref_model(model_dir, tokenizer, hh_rows):
    def args():
        return dpo_args(
            max_steps=4,
            logging_steps=1,
            learning_rate=5e-4,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            sync_ref_model=True,
            ref_model_sync_steps=2,
            ref_model_mixup_alpha=0.5,
            gradient_checkpointing=False,
        )

    def make(cls):
        return cls(model=model_dir("qwen2"), args=args(), train_dataset=hh_rows, processing_class=tokenizer)

    stock, ours = build_pair(make)
    stock_losses, our_losses = _train_losses(stock), _train_losses(ours)
    assert len(our_losses) == 4
    for a, e in zip(our_losses, stock_losses, strict=True):
        assert math.isclose(a, e, rel_tol=1e-4, abs_tol=1e-6), (a, e)


def test_moe_aux_loss_matches_stock(tokenizer, hh_rows, tmp_path):
    """MoE with the router's load-balancing loss on: each packed token is weighted by the stock rows holding it (a
    shared prompt token by both), so the aux loss, the total loss and the gradients equal stock's."""
    from transformers import AutoModelForCausalLM

    config = tiny_moe_config(len(tokenizer))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float64).save_pretrained(tmp_path)
    stock, ours = make_pair(str(tmp_path), tokenizer, hh_rows)
    stock_batch, our_batch = first_batch(stock, BATCH), first_batch(ours, BATCH)
    assert our_batch[PACKED_KEY]["input_ids"].numel() < stock_batch["input_ids"].numel()
    # An unweighted aux loss (the shared prompt counted once) moved the total loss by 1.1e-3 relative here.
    assert_equivalent(stock, ours, stock_batch, our_batch)
    _, _, stock_metrics = loss_and_grads(stock, stock_batch)
    _, _, our_metrics = loss_and_grads(ours, our_batch)
    assert stock_metrics["aux_loss"][0] > 0
    assert math.isclose(our_metrics["aux_loss"][0], stock_metrics["aux_loss"][0], rel_tol=1e-6)


def test_plain_dpo_config_gets_defaults(model_dir, tokenizer, hh_rows):
    trainer = PrefixSharedDPOTrainer(
        model=model_dir("llama"), args=dpo_args(), train_dataset=hh_rows, processing_class=tokenizer
    )
    assert trainer.prefix_share_args.share_prefix and trainer.prefix_share_args.max_row_tokens is None
    assert isinstance(trainer, DPOTrainer)

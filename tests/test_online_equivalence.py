"""GRPO and RLOO: PrefixShared* against stock TRL on the same generation batch (real prompts, shared tokenizer).

Two model families (Llama, Qwen2). Both trainers generate from the same seed, so they hold the same completions;
then the old-policy and reference log-probs of the generation step, and the loss, every gradient and every logged
metric of the policy step for every GRPO loss type, must agree within RELATIVE_TOLERANCE (float64 models; what is
left is TRL's float32 log-softmax, see equivalence.py). A short seeded `train()` must log the same losses and end at
the same weights.
"""

from __future__ import annotations

import pytest
import torch
from equivalence import (
    RELATIVE_TOLERANCE,
    assert_equivalent,
    perturb,
    relative_difference,
    rotary_in_float64,
    tree_depth,
)
from online_setup import generate_and_score, generation_batch, online_args, real_prompts, vowel_reward
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_prefix_share.trainers.online.grpo import PrefixSharedGRPOTrainer
from trl_prefix_share.trainers.online.rloo import PrefixSharedRLOOTrainer

FAMILIES = ("llama", "qwen2")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
PROMPTS = 3  # prompts per generation batch: 12 rows, groups of 4


@pytest.fixture(scope="module", autouse=True)
def exact_rotary_angles():
    """Prompts that start alike share a prefix-tree node at other position ids than stock's left padding gives them:
    rotary angles in float64, so the float64 comparison sees no float32 angle rounding (see `float64_rotary_forward`;
    tests/test_prefix_trees.py checks the shift itself against stock's own padding noise)."""
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    with pytest.MonkeyPatch.context() as patch:
        rotary_in_float64(patch, llama, qwen2)
        yield


def build(trainer_cls, config_cls, path, tokenizer, dataset, **fields):
    args = online_args(config_cls, per_device_train_batch_size=PROMPTS * 4, **fields)
    trainer = trainer_cls(
        model=path, reward_funcs=vowel_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    perturb(trainer.model)  # away from the symmetric init point (identical noise on both sides)
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`; read by the loss normalisation
    return trainer


def masked_relative(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.bool()
    return relative_difference(actual[mask], expected[mask])


def with_edge_rows(inputs: dict, tool_tokens: bool = False) -> dict:
    """The generation batch with one completion fully masked (what `mask_truncated_completions` does to a truncated
    one), one cut short (an early EOS) and one equal to its neighbour's (identical completions are scored once).
    `tool_tokens`: a multi-turn completion whose middle tokens are a tool's output (attended to, not trained on:
    TRL's `tool_mask`)."""
    edited = dict(inputs)
    completion_ids = inputs["completion_ids"].clone()
    completion_mask = inputs["completion_mask"].clone()
    completion_mask[1] = 0
    completion_mask[2, 3:] = 0
    completion_ids[5] = completion_ids[4]
    completion_mask[5] = completion_mask[4]
    edited["completion_ids"], edited["completion_mask"] = completion_ids, completion_mask
    if tool_tokens:
        tool_mask = torch.ones_like(completion_mask)
        tool_mask[6, 2:5] = 0
        edited["tool_mask"] = tool_mask
    return edited


# -- GRPO --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def grpo_pair(request, model_dir, tokenizer):
    """(stock, ours, stock's generation batch, ours) with beta > 0 and num_iterations = 2: the reference and the
    old-policy passes both run."""
    dataset = real_prompts(PROMPTS)
    fields = dict(beta=0.1, num_iterations=2)
    stock = build(GRPOTrainer, GRPOConfig, model_dir(request.param), tokenizer, dataset, **fields)
    ours = build(PrefixSharedGRPOTrainer, GRPOConfig, model_dir(request.param), tokenizer, dataset, **fields)
    assert ours.prefix_share_enabled and ours.prefix_share_fallback is None
    batch = generation_batch(dataset, PROMPTS)
    return stock, ours, generate_and_score(stock, batch), generate_and_score(ours, batch)


def test_grpo_generation_step_matches_stock(grpo_pair):
    stock, ours, expected, actual = grpo_pair
    assert torch.equal(actual["completion_ids"], expected["completion_ids"])  # generation is untouched
    mask = expected["completion_mask"]
    assert mask.sum() > 0
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        assert expected[key] is not None and actual[key] is not None, key
        assert masked_relative(actual[key], expected[key], mask) <= RELATIVE_TOLERANCE, key
    assert torch.allclose(actual["advantages"], expected["advantages"])


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_loss_grads_and_metrics_match_stock(grpo_pair, loss_type):
    stock, ours, inputs, _ = grpo_pair
    level = "sequence" if loss_type == "luspo" else "token"
    for trainer in (stock, ours):
        trainer.loss_type, trainer.importance_sampling_level = loss_type, level
    assert_equivalent(stock, ours, inputs, inputs)


def test_grpo_edge_rows_entropy_mask_and_sequence_level_match_stock(grpo_pair):
    """Empty, short and repeated completions, tool-output tokens; entropy masking (a quantile gathered over the
    batch); sequence-level importance sampling."""
    stock, ours, inputs, _ = grpo_pair
    for trainer in (stock, ours):
        trainer.loss_type, trainer.importance_sampling_level, trainer.top_entropy_quantile = "grpo", "sequence", 0.5
    try:
        edited = with_edge_rows(inputs, tool_tokens=True)
        assert_equivalent(stock, ours, edited, edited)
    finally:
        for trainer in (stock, ours):
            trainer.top_entropy_quantile = 1.0


def test_grpo_policy_step_shares_each_group(grpo_pair):
    """One document per prompt: the micro-batch's packed rows hold each prompt once."""
    _, ours, inputs, _ = grpo_pair
    ours._metrics["train"].clear()
    ours.compute_loss(ours.model, inputs)
    metrics = ours._metrics["train"]
    stock_tokens = metrics["prefix_share/stock_tokens"][-1]
    assert stock_tokens == inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()
    real = int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
    prompt_tokens = int(inputs["prompt_mask"].sum())
    # Prompt once per group (plus one repeated token per branch) + the completions: far below the real tokens.
    assert metrics["prefix_share/tokens"][-1] <= real - prompt_tokens * 3 / 4 + inputs["prompt_ids"].size(0)


# -- RLOO --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_rloo_generation_and_policy_step_match_stock(family, model_dir, tokenizer, monkeypatch):
    """Chat prompts: their template's head is common to all, so with trees on short heads (a minimum of 2 shared
    tokens) the passes run one prefix tree over prompts of different left padding."""
    from trl_prefix_share import PrefixSharedRLOOConfig
    from trl_prefix_share.core.online import rows as online_rows

    dataset = real_prompts(PROMPTS, offset=10, conversational=True)
    fields = dict(beta=0.05, num_iterations=2)
    stock = build(RLOOTrainer, RLOOConfig, model_dir(family), tokenizer, dataset, **fields)
    ours = build(
        PrefixSharedRLOOTrainer,
        PrefixSharedRLOOConfig,
        model_dir(family),
        tokenizer,
        dataset,
        prefix_tree_min_shared_tokens=2,
        **fields,
    )
    batch = generation_batch(dataset, PROMPTS)
    pack, depths = online_rows.pack_documents, []

    def recorded(*args, **kwargs):
        packed = pack(*args, **kwargs)
        depths.append(tree_depth(packed))
        return packed

    monkeypatch.setattr(online_rows, "pack_documents", recorded)
    expected, actual = generate_and_score(stock, batch), generate_and_score(ours, batch)
    assert depths and min(depths) >= 2
    assert torch.equal(actual["completion_ids"], expected["completion_ids"])
    assert relative_difference(actual["old_logps"], expected["old_logps"]) <= RELATIVE_TOLERANCE
    assert torch.allclose(actual["advantages"], expected["advantages"], rtol=1e-5, atol=1e-6)
    assert_equivalent(stock, ours, expected, expected)
    assert_equivalent(stock, ours, with_edge_rows(expected), with_edge_rows(expected))


# -- train() -----------------------------------------------------------------------------------------------------------

#: Adam divides each step by the running gradient size, so a weight whose gradient is ~0 moves by a full step in the
#: direction of its float noise (in stock TRL too, between any two batch arrangements). These runs use plain SGD, whose
#: steps are linear in the gradients, so the weight updates can be held to the gradient tolerance.
TRAIN_OPTIMIZER = dict(optim="sgd", learning_rate=0.5)


@pytest.mark.parametrize(
    ("trainer_pair", "config_cls", "family", "fields"),
    [
        # several micro-batches per generation (groups split by TRL's shuffle), accumulation, the reference pass
        # synced into the policy after every step (`sync_ref_model`)
        (
            (GRPOTrainer, PrefixSharedGRPOTrainer),
            GRPOConfig,
            "llama",
            dict(
                beta=0.1,
                steps_per_generation=2,
                gradient_accumulation_steps=2,
                loss_type="grpo",
                sync_ref_model=True,
                ref_model_sync_steps=1,
                ref_model_mixup_alpha=0.5,
            ),
        ),
        # beta = 0 (no reference), gradient checkpointing, the default loss
        ((RLOOTrainer, PrefixSharedRLOOTrainer), RLOOConfig, "qwen2", dict(beta=0.0, gradient_checkpointing=True)),
    ],
    ids=["grpo-llama", "rloo-qwen2"],
)
def test_short_train_matches_stock(trainer_pair, config_cls, family, fields, model_dir, tokenizer):
    dataset = real_prompts(8, offset=20, conversational=family == "qwen2")
    histories, weights = [], []
    for trainer_cls in trainer_pair:
        args = online_args(config_cls, per_device_train_batch_size=8, max_steps=2, **TRAIN_OPTIMIZER, **fields)
        trainer = trainer_cls(
            model=model_dir(family),
            reward_funcs=vowel_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        torch.manual_seed(0)
        trainer.train()
        histories.append([entry for entry in trainer.state.log_history if "loss" in entry])
        weights.append({name: (p.detach() - initial[name], p.detach()) for name, p in trainer.model.named_parameters()})
    stock_log, our_log = histories
    assert len(stock_log) == len(our_log) == 2
    for expected, actual in zip(stock_log, our_log, strict=True):
        assert actual["reward"] == expected["reward"]  # same completions
        for key in ("loss", "entropy", "grad_norm"):
            assert actual[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-7), key
        assert actual["prefix_share/token_ratio"] > 1.0
    moved = [name for name, (delta, _) in weights[0].items() if float(delta.abs().max()) > 0]
    assert len(moved) > len(weights[0]) // 2, "training barely moved the weights: the comparison would be vacuous"
    for name, (delta, value) in weights[0].items():
        assert relative_difference(weights[1][name][1], value) <= RELATIVE_TOLERANCE, name
        assert relative_difference(weights[1][name][0], delta) <= RELATIVE_TOLERANCE, f"update of {name}"

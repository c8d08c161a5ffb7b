"""Models the packed path must not serve silently wrong: sliding windows that live only on the layer or in the mask,
hybrids with convolution / SSM mixers (found by the structural check, also with the probe off or skipped), models
the probe catches, and the exact fallback to stock training (or an error, on request) in every trainer.
"""

from __future__ import annotations

import logging
import math
import types
import warnings

import pytest
import torch
from conftest import load_dataset_rows, save_tiny_model
from equivalence import EQUIVALENCE_DTYPE, assert_equivalent, build_pair, first_batch, perturb
from test_dpo_equivalence import BATCH, dpo_args
from transformers import AutoConfig, AutoModelForCausalLM
from trl import DPOTrainer, RewardTrainer

from trl_prefix_share import PrefixSharedDPOConfig, PrefixSharedDPOTrainer, UnsupportedModelError
from trl_prefix_share.core.attention import ATTENTION_NAME, register_attention
from trl_prefix_share.core.installer import PrefixShareFallbackWarning, install_or_fall_back
from trl_prefix_share.core.model_structure import inspect_model
from trl_prefix_share.core.model_support import enable_prefix_sharing, verify_packed_forward
from trl_prefix_share.core.options import PrefixShareArguments
from trl_prefix_share.core.packed_forward import install_packed_forward
from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.trainers.dpo.validation import validate_preference_dataset
from trl_prefix_share.trainers.reward.config import PrefixSharedRewardConfig
from trl_prefix_share.trainers.reward.trainer import PrefixSharedRewardTrainer

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
#: Sliding windows at 32: longer than a short probe, shorter than these batches. Qwen2-MoE keeps the window on the
#: layer (`self.sliding_window`), PhiMoE only in its mask; neither passes a `sliding_window` keyword.
SLIDING = {
    "qwen2_moe": dict(
        use_sliding_window=True,
        sliding_window=32,
        max_window_layers=2,
        num_hidden_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        router_aux_loss_coef=0.0,
    ),
    # `num_experts` too: TRL's fused head reads that name for every MoE. No router aux loss in either model: ours is
    # computed over the tokens run (test_dpo_equivalence.test_moe_aux_loss_is_added), here only attention is tested.
    "phimoe": dict(
        sliding_window=32,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.0,
    ),
}
#: These MoE routers take their softmax in float32 (Qwen2-MoE: `dtype=torch.float`) even in a float64 model, so the
#: router's gradients carry float32 noise: measured 2.2e-4 relative (gate weights), 4.7e-6 on the loss. Ignoring the
#: window instead moves the loss by 0.24 and gradients by > 1 relative, so 1e-3 still separates the two by 200x.
MOE_ROUTER_TOLERANCE = 1e-3
#: Hybrids whose state-carrying mixers the packed path does not serve (a Mamba1 selective scan, which transformers'
#: torch path cannot start from a cached state): Jamba (with attention layers) and Mamba (without).
HYBRIDS = {
    "jamba": dict(
        num_hidden_layers=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=4,
    ),
    "mamba": dict(num_hidden_layers=2, state_size=8),
}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    """Factory: path of a saved tiny model of `model_type` with `config` (causal LM, or sequence classification)."""
    cache: dict[tuple, str] = {}

    def get(model_type: str, reward: bool = False, **config) -> str:
        key = (model_type, reward, tuple(sorted((k, str(v)) for k, v in config.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{model_type}-{'rm' if reward else 'lm'}")
            cache[key] = save_tiny_model(directory, tokenizer, model_type, reward, **{**SMALL, **config})
        return cache[key]

    return get


@pytest.fixture(scope="module")
def hh_rows():
    return load_dataset_rows("hh_harmless", 8)


def dpo_pair(path, tokenizer, rows, **options):
    def make(cls):
        args = dpo_args(PrefixSharedDPOConfig, **options) if cls is not DPOTrainer else dpo_args()
        trainer = cls(model=path, args=args, train_dataset=rows, processing_class=tokenizer)
        perturb(trainer.model)
        return trainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stock, ours = build_pair(make)
    return stock, ours, [w for w in caught if issubclass(w.category, PrefixShareFallbackWarning)]


def assert_fell_back(ours, fallback_warnings, reason: str) -> None:
    assert ours.prefix_share_fallback and reason in ours.prefix_share_fallback, ours.prefix_share_fallback
    assert len(fallback_warnings) == 1 and reason in str(fallback_warnings[0].message)
    assert "on_unsupported_model='error'" in str(fallback_warnings[0].message)
    assert ours.model.config._attn_implementation != ATTENTION_NAME


# -- sliding windows -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", SLIDING)
def test_window_on_the_layer_or_in_the_mask_is_served_exactly(model_type, saved_model, tokenizer, hh_rows):
    stock, ours, fallback = dpo_pair(saved_model(model_type, **SLIDING[model_type]), tokenizer, hh_rows)
    assert not fallback and ours.prefix_share_fallback is None  # served, not the fallback
    windows = {getattr(m, "prefix_share_window", None) for m in ours.model.modules()}
    assert 32 in windows
    stock_batch, our_batch = first_batch(stock, BATCH), first_batch(ours, BATCH)
    assert stock_batch["input_ids"].size(1) > 2 * 32  # sequences reach well past the window
    assert our_batch[PACKED_KEY]["input_ids"].numel() < stock_batch["input_ids"].numel()
    # PhiMoE samples its experts at random in training mode (sparsemixer): compare it in eval mode (loss, metrics).
    mode = "eval" if model_type == "phimoe" else "train"
    assert_equivalent(stock, ours, stock_batch, our_batch, mode=mode, tolerance=MOE_ROUTER_TOLERANCE)


def test_layer_windows_follow_the_config(saved_model):
    qwen = AutoModelForCausalLM.from_pretrained(saved_model("qwen2_moe", **SLIDING["qwen2_moe"]))
    assert inspect_model(qwen).windows == {0: 32, 1: None}  # layer_types alternate sliding / full
    phi = AutoModelForCausalLM.from_pretrained(saved_model("phimoe", **SLIDING["phimoe"]))
    assert inspect_model(phi).windows == {0: 32, 1: 32}  # no layer_types: the one mask of every layer
    qwen.model.layers[1].self_attn.sliding_window = 7  # a layer that disagrees with its config: not determinable
    assert any("sliding window on layer" in reason for reason in inspect_model(qwen).reasons)


# -- hybrids and the exact fallback -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_hybrid_falls_back_exactly_with_the_probe_off(model_type, saved_model, tokenizer, hh_rows):
    stock, ours, fallback = dpo_pair(
        saved_model(model_type, **HYBRIDS[model_type]), tokenizer, hh_rows, verify_model=False
    )
    assert_fell_back(ours, fallback, "carry a state along the sequence")
    stock_batch, our_batch = first_batch(stock, BATCH), first_batch(ours, BATCH)
    assert PACKED_KEY not in our_batch
    assert_equivalent(stock, ours, stock_batch, our_batch)
    ours._metrics["train"].clear()
    ours.compute_loss(ours.model, our_batch)
    metrics = ours._metrics["train"]
    assert metrics["prefix_share/token_ratio"] == [1.0]
    assert metrics["prefix_share/tokens"] == metrics["prefix_share/stock_tokens"] == [our_batch["input_ids"].numel()]


def test_error_mode_raises_instead(saved_model, tokenizer, hh_rows):
    with pytest.raises(
        UnsupportedModelError, match="JambaMambaMixer does not start its multi-token scan from a cached state"
    ):
        PrefixSharedDPOTrainer(
            model=saved_model("jamba", **HYBRIDS["jamba"]),
            args=dpo_args(PrefixSharedDPOConfig, on_unsupported_model="error"),
            train_dataset=hh_rows,
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="on_unsupported_model"):
        PrefixSharedDPOTrainer(
            model=saved_model("jamba", **HYBRIDS["jamba"]),
            args=dpo_args(PrefixSharedDPOConfig, on_unsupported_model="ignore"),
            train_dataset=hh_rows,
            processing_class=tokenizer,
        )


def sharded_trainer(**options) -> types.SimpleNamespace:
    """What `install_or_fall_back` reads of a trainer, under FSDP (where the probe is skipped)."""
    return types.SimpleNamespace(
        prefix_share_args=PrefixShareArguments(**options),
        prefix_share_fallback=None,
        is_deepspeed_enabled=False,
        is_fsdp_enabled=True,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )


def test_structural_check_holds_where_the_probe_is_skipped(saved_model, model_dir):
    from trl.trainer.utils import add_fused_lm_head

    def probe_must_not_run(*args):
        raise AssertionError("the probe ran under FSDP")

    for model_type in HYBRIDS:
        model = AutoModelForCausalLM.from_pretrained(saved_model(model_type, **HYBRIDS[model_type]))
        add_fused_lm_head(model)
        trainer = sharded_trainer()
        with pytest.warns(PrefixShareFallbackWarning):
            assert not install_or_fall_back(trainer, [model], enable_prefix_sharing, probe_must_not_run, "sdpa")
        assert model.config._attn_implementation != ATTENTION_NAME
    llama = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    add_fused_lm_head(llama)
    assert install_or_fall_back(sharded_trainer(), [llama], enable_prefix_sharing, probe_must_not_run, "sdpa")


def test_probe_separates_a_hybrid_from_float_noise_at_initialisation(tokenizer):
    """LFM2 switched without its short convolutions segmented (a state leaking across documents and branches)
    drifts from stock by ~1e-5 in log-probability at its default initialisation, which the old 1e-3 tolerance let
    through; the probe's noise-based tolerance (float32 here, as users train) refuses it, and passes Llama."""
    from trl.trainer.utils import add_fused_lm_head

    register_attention()
    for model_type, extra, should_pass in (
        ("llama", {}, True),
        ("lfm2", {"layer_types": ["conv", "full_attention"]}, False),
    ):
        config = AutoConfig.for_model(model_type, **{**SMALL, "num_hidden_layers": 2, **extra}, vocab_size=512)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        add_fused_lm_head(model)
        model.set_attn_implementation(ATTENTION_NAME)  # the switch without the structural check, to test the probe
        install_packed_forward(model, "sdpa")
        if should_pass:
            verify_packed_forward(model, "sdpa", torch.device("cpu"))
        else:
            with pytest.raises(UnsupportedModelError, match="own float noise"):
                verify_packed_forward(model, "sdpa", torch.device("cpu"))


def test_probe_failure_falls_back_and_restores_the_model(saved_model, tokenizer, hh_rows):
    """Doge looks like attention but builds a learned mask inside its layer: the probe catches it, the trainer
    restores the model's own attention and trains exactly like stock."""
    stock, ours, fallback = dpo_pair(
        saved_model("doge", num_hidden_layers=2, router_aux_loss_coef=0.0), tokenizer, hh_rows
    )
    assert_fell_back(ours, fallback, "own attention mask")
    assert_equivalent(stock, ours, first_batch(stock, BATCH), first_batch(ours, BATCH))


# -- every trainer falls back the same way ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_orpo_and_cpo_fall_back_exactly(kind, saved_model, tokenizer):
    from test_orpo_cpo import first_batch as paired_batch
    from test_orpo_cpo import loss_grads_metrics, make_pair, short_rows

    with pytest.warns(PrefixShareFallbackWarning, match="carry a state"):
        stock, ours = make_pair(kind, saved_model("jamba", **HYBRIDS["jamba"]), tokenizer, short_rows("hh_harmless", 4))
    our_batch = paired_batch(ours)
    assert PACKED_KEY not in our_batch
    stock_loss, stock_grads, stock_metrics = loss_grads_metrics(stock, paired_batch(stock))
    our_loss, our_grads, our_metrics = loss_grads_metrics(ours, our_batch)
    assert torch.equal(our_loss, stock_loss)  # the very same computation: stock's forward on stock's batch
    assert stock_grads.keys() == our_grads.keys() and stock_grads
    assert all(torch.equal(our_grads[name], grad) for name, grad in stock_grads.items())
    assert all(our_metrics[key] == value for key, value in stock_metrics.items())  # logits/* too: stock's forward
    assert our_metrics["prefix_share/token_ratio"] == 1.0
    assert our_metrics["prefix_share/tokens"] == our_metrics["prefix_share/stock_tokens"] > 0


def test_encoder_decoder_orpo_falls_back_exactly(tokenizer, tmp_path):
    from test_orpo_cpo import STOCK, loss_grads_metrics, make_args, short_rows
    from test_orpo_cpo import first_batch as paired_batch
    from transformers import AutoModelForSeq2SeqLM

    from trl_prefix_share.trainers.paired.orpo import PrefixSharedORPOConfig, PrefixSharedORPOTrainer

    config = AutoConfig.for_model(
        "t5",
        dropout_rate=0.0,
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=1,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config, dtype=EQUIVALENCE_DTYPE).save_pretrained(tmp_path)
    rows = short_rows("hh_harmless", 4)

    def make(trainer_cls, config_cls):
        model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)  # by object: TRL loads paths as causal LMs
        args = make_args(config_cls, model_init_kwargs=None)
        trainer = trainer_cls(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
        perturb(trainer.model)
        return trainer

    stock = make(*STOCK["orpo"])
    with pytest.warns(PrefixShareFallbackWarning, match="encoder-decoder"):
        ours = make(PrefixSharedORPOTrainer, PrefixSharedORPOConfig)
    stock_loss, stock_grads, _ = loss_grads_metrics(stock, paired_batch(stock))
    our_loss, our_grads, our_metrics = loss_grads_metrics(ours, paired_batch(ours))
    assert torch.equal(our_loss, stock_loss) and stock_grads.keys() == our_grads.keys()
    assert our_metrics["prefix_share/token_ratio"] == 1.0


def test_reward_falls_back_exactly(saved_model, tokenizer, hh_rows):
    from test_reward import reward_args

    jamba = dict(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, num_experts=1, mamba_d_state=8)
    path = saved_model("jamba", reward=True, **jamba)
    stock = RewardTrainer(model=path, args=reward_args(), train_dataset=hh_rows, processing_class=tokenizer)
    with pytest.warns(PrefixShareFallbackWarning, match="carry a state"):
        ours = PrefixSharedRewardTrainer(
            model=path, args=reward_args(PrefixSharedRewardConfig), train_dataset=hh_rows, processing_class=tokenizer
        )
    for trainer in (stock, ours):
        perturb(trainer.model)
    our_batch = first_batch(ours, BATCH)
    assert PACKED_KEY not in our_batch
    assert_equivalent(stock, ours, first_batch(stock, BATCH), our_batch)


# -- small things ------------------------------------------------------------------------------------------------------


def test_drop_warning_does_not_advise_what_is_set(caplog):
    from datasets import Dataset

    rows = Dataset.from_list(
        [
            {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": []},
            {"prompt_ids": [1], "chosen_ids": [4], "rejected_ids": [5]},
        ]
    )
    with pytest.raises(ValueError, match="drop_invalid_examples=True"):
        validate_preference_dataset(rows, "train", None, "keep_start", None, drop_invalid=False)
    with caplog.at_level(logging.WARNING):
        kept = validate_preference_dataset(rows, "train", None, "keep_start", None, drop_invalid=True)
    assert len(kept) == 1 and "Dropping 1 example" in caplog.text
    assert "set `drop_invalid_examples=True`" not in caplog.text


def test_max_length_below_every_prompt_names_the_cause(model_dir, tokenizer, hh_rows):
    with pytest.raises(ValueError, match="every prompt alone fills `max_length`"):
        PrefixSharedDPOTrainer(
            model=model_dir("llama"), args=dpo_args(max_length=3), train_dataset=hh_rows, processing_class=tokenizer
        )


def test_fallback_training_logs_ratio_one(saved_model, tokenizer, hh_rows):
    """A short `train()` in the fallback: the logged ratio is 1.0 and the losses are stock's."""
    rows = load_dataset_rows("hh_harmless", 8)

    def make(cls):
        args = dpo_args(max_steps=2, logging_steps=1, learning_rate=1e-3, gradient_checkpointing=False)
        return cls(
            model=saved_model("jamba", **HYBRIDS["jamba"]), args=args, train_dataset=rows, processing_class=tokenizer
        )

    with pytest.warns(PrefixShareFallbackWarning):
        stock, ours = build_pair(make)
    stock.train()
    ours.train()
    stock_logs = [e for e in stock.state.log_history if "loss" in e]
    our_logs = [e for e in ours.state.log_history if "loss" in e]
    assert len(our_logs) == 2
    for a, e in zip(our_logs, stock_logs, strict=True):
        assert math.isclose(a["loss"], e["loss"], rel_tol=1e-9), (a["loss"], e["loss"])
        assert a["prefix_share/token_ratio"] == 1.0

"""Online RL beyond the main equivalence runs: the row layout, chunking, MoE aux loss, LoRA, and every input or model
the packed path does not serve (scored the stock way, exactly)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_moe_config
from equivalence import RELATIVE_TOLERANCE, assert_equivalent, perturb, relative_difference
from online_setup import NUM_GENERATIONS, generate_and_score, generation_batch, online_args, real_prompts, vowel_reward
from transformers import AutoConfig, AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_prefix_share import PrefixShareFallbackWarning
from trl_prefix_share.core.online.rows import UnshareableRows, chunk_by_prompt, pack_completion_rows, read_rows
from trl_prefix_share.core.online.support import absolute_position_tables
from trl_prefix_share.core.packing import PackingOptions
from trl_prefix_share.trainers.online.config import PrefixSharedGRPOConfig
from trl_prefix_share.trainers.online.grpo import PrefixSharedGRPOTrainer
from trl_prefix_share.trainers.online.rloo import PrefixSharedRLOOTrainer

# -- the row layout (no model) -----------------------------------------------------------------------------------------


def rows(prompts: list[list[int]], completions: list[list[int]], pad: int = 0):
    """Left-padded prompts + right-padded completions, as TRL builds them."""
    width = max(len(p) for p in prompts)
    keep = max(max((len(c) for c in completions), default=0), 1)
    ids = torch.full((len(prompts), width + keep), pad)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids[row, width - len(prompt) : width] = torch.tensor(prompt)
        mask[row, width - len(prompt) : width] = 1
        if completion:
            ids[row, width : width + len(completion)] = torch.tensor(completion)
            mask[row, width : width + len(completion)] = 1
    return ids, mask, keep


def test_rows_group_by_prompt_and_score_identical_completions_once():
    a, b = [5, 6, 7, 8], [9, 10]
    ids, mask, keep = rows([a, b, a, a, b], [[1, 2, 3], [4], [1, 2, 3], [11, 12], []])
    shape = read_rows(ids, mask, keep)
    assert shape.prompt_groups.tolist() == [0, 1, 0, 0, 1]
    packed = pack_completion_rows(ids, mask, keep, 0, PackingOptions())
    # Prompt a: 3 shared + branches [8,1,2,3] and [8,11,12] (the repeat of [1,2,3] is scored from the first);
    # prompt b: 1 shared + branch [10,4] + a one-token branch for the empty completion.
    assert packed["input_ids"].numel() == (3 + 4 + 3) + (1 + 2 + 1)
    # Each labelled completion token lands at its stock (shifted) column, positions are the stock columns.
    width = ids.size(1) - keep
    targets = packed["target_index"]
    expected = [r * (ids.size(1) - 1) + width - 1 + t for r in range(5) for t in range(int(mask[r, width:].sum()))]
    assert sorted(targets.tolist()) == sorted(expected)
    labels = packed["shift_labels"].reshape(-1)[packed["label_index"]]
    assert labels.tolist() == ids[:, 1:].reshape(-1)[targets].tolist()  # column c predicts the token at c + 1
    assert packed["position_ids"][0, 0] == 0 and packed["position_ids"][0, 3] == width - 1
    # Weights: how many stock rows hold each packed token (the MoE aux loss's mean is over those).
    assert int(packed["token_weights"].sum()) == int(mask.sum())


def test_rows_that_are_not_trl_layout_are_refused():
    ids, mask, keep = rows([[5, 6], [7, 8]], [[1, 2], [3]])
    holed = mask.clone()
    holed[0, -2] = 0  # a hole inside the completion
    with pytest.raises(UnshareableRows, match="holes"):
        read_rows(ids, holed, keep)
    empty = mask.clone()
    empty[1, : ids.size(1) - keep] = 0
    with pytest.raises(UnshareableRows, match=r"rows \[1\] have an empty prompt"):
        read_rows(ids, empty, keep)


def test_chunks_keep_prompt_groups_whole():
    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 4 + [[6]] * 2
    ids, mask, keep = rows(prompts, [[7, 8]] * 10)
    shape = read_rows(ids, mask, keep)
    row_tokens = mask.sum(dim=1)
    chunks = chunk_by_prompt(shape, row_tokens, budget_rows=3, row_width=ids.size(1))
    for chunk in chunks:  # every group lies in one chunk
        groups = set(shape.prompt_groups[chunk].tolist())
        assert all(set((shape.prompt_groups == g).nonzero().flatten().tolist()) <= set(chunk.tolist()) for g in groups)
    assert sorted(torch.cat(chunks).tolist()) == list(range(10))
    # A group bigger than a stock chunk is split into stock-sized pieces.
    big = chunk_by_prompt(shape, row_tokens, budget_rows=1, row_width=4)
    assert max(len(chunk) for chunk in big) == 1 and len(big) == 10


# -- trainers ----------------------------------------------------------------------------------------------------------


def grpo_trainer(cls, path, tokenizer, dataset, config_cls=GRPOConfig, **fields):
    args = online_args(config_cls, per_device_train_batch_size=2 * NUM_GENERATIONS, beta=0.1, **fields)
    trainer = cls(model=path, reward_funcs=vowel_reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    perturb(trainer.model)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.fixture(scope="module")
def llama_pair(model_dir, tokenizer):
    dataset = real_prompts(2, offset=30)
    stock = grpo_trainer(GRPOTrainer, model_dir("llama"), tokenizer, dataset)
    ours = grpo_trainer(PrefixSharedGRPOTrainer, model_dir("llama"), tokenizer, dataset)
    return stock, ours, generate_and_score(stock, generation_batch(dataset, 2))


def logps(trainer, inputs, batch_size=None, **extra):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        out, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, inputs["completion_ids"].size(1), batch_size=batch_size, **extra
        )
    return out, mask[:, -inputs["completion_ids"].size(1) :]


def test_chunked_pass_matches_stock_chunks(llama_pair):
    """The old-policy / reference passes run in `batch_size` chunks: ours keeps groups whole, stock does not."""
    stock, ours, inputs = llama_pair
    # Interleave the two prompts' rows, so chunks of whole groups are not contiguous and must be put back in order.
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    shuffled = {k: v[order] if torch.is_tensor(v) and v.dim() and v.size(0) == 8 else v for k, v in inputs.items()}
    for batch in (inputs, shuffled):
        expected, mask = logps(stock, batch, batch_size=3)
        actual, _ = logps(ours, batch, batch_size=3)
        assert relative_difference(actual[mask.bool()], expected[mask.bool()]) <= RELATIVE_TOLERANCE


def test_unshareable_rows_and_image_inputs_take_the_stock_pass(llama_pair, caplog):
    stock, ours, inputs = llama_pair
    edited = dict(inputs)
    edited["prompt_mask"] = inputs["prompt_mask"].clone()
    edited["prompt_mask"][0] = 0  # an empty prompt: nothing to share, stock's own numbers are returned
    expected, mask = logps(stock, edited)
    with caplog.at_level("WARNING"):
        actual, _ = logps(ours, edited)
    assert torch.equal(actual, expected) and "empty prompt" in caplog.text
    # Image inputs are TRL's business until vision prompts are served: the stock pass, untouched.
    calls = []
    original = GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("pixel_values"))
        return original(self, *args, **{**kwargs, "pixel_values": None})

    GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__ = spy
    try:
        logps(ours, inputs, pixel_values=torch.zeros(1))
    finally:
        GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__ = original
    assert len(calls) == 1 and calls[0] is not None


def test_batch_without_shared_prompts_is_exact(llama_pair):
    """Every row its own prompt (e.g. `num_generations` rows spread over micro-batches): exact, no saving."""
    stock, ours, inputs = llama_pair
    distinct = dict(inputs)
    distinct["prompt_ids"] = inputs["prompt_ids"].clone()
    distinct["prompt_ids"][:, -1] = torch.arange(len(distinct["prompt_ids"])) + 100
    assert_equivalent(stock, ours, distinct, distinct)
    ratio = ours._metrics["train"]["prefix_share/token_ratio"][-1]
    assert ratio >= 1.0  # only padding is saved


def test_moe_aux_loss_matches_stock(tmp_path, tokenizer):
    config = tiny_moe_config(len(tokenizer))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float64).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    dataset = real_prompts(2, offset=40)
    stock = grpo_trainer(GRPOTrainer, str(tmp_path), tokenizer, dataset)
    ours = grpo_trainer(PrefixSharedGRPOTrainer, str(tmp_path), tokenizer, dataset)
    assert ours.aux_loss_enabled and ours.prefix_share_enabled
    for trainer in (stock, ours):
        # transformers' MoE forward fails in `generate` with `output_router_logits` in the config (its aux loss reads
        # the whole attention mask against one new token's router logits), in stock TRL too. Off in the config, the
        # trainers still ask for router logits in their log-prob passes (`aux_loss_enabled` is read at init).
        trainer.model.config.output_router_logits = False
    inputs = generate_and_score(stock, generation_batch(dataset, 2))
    assert_equivalent(stock, ours, inputs, inputs)
    assert stock._metrics["train"]["aux_loss"][0] > 0
    assert ours._metrics["train"]["aux_loss"][0] == pytest.approx(stock._metrics["train"]["aux_loss"][0], rel=1e-6)


def test_lora_with_adapter_disabled_reference_matches_stock(model_dir, tokenizer):
    from peft import LoraConfig

    dataset = real_prompts(2, offset=50)

    def make(cls):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        args = online_args(GRPOConfig, per_device_train_batch_size=8, beta=0.2, num_iterations=2)
        trainer = cls(
            model=model_dir("qwen2"),
            reward_funcs=vowel_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
        perturb(trainer.model, only="lora_")  # LoRA B starts at zero: move it so the adapter changes the model
        trainer.current_gradient_accumulation_steps = 1
        return trainer

    stock, ours = make(GRPOTrainer), make(PrefixSharedGRPOTrainer)
    assert ours.ref_model is None and ours.prefix_share_enabled
    batch = generation_batch(dataset, 2)
    expected, actual = generate_and_score(stock, batch), generate_and_score(ours, batch)
    mask = expected["completion_mask"].bool()
    for key in ("ref_per_token_logps", "old_per_token_logps"):
        assert relative_difference(actual[key][mask], expected[key][mask]) <= RELATIVE_TOLERANCE, key
    assert_equivalent(stock, ours, expected, expected)


def test_absolute_position_models_fall_back_exactly(tmp_path, tokenizer):
    """GPT-2 adds learned absolute positions: how they number left-padded rows is the model's own rule, so the
    online trainers refuse it by what it is (probe off too) and train like stock TRL."""
    config = AutoConfig.for_model(
        "gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512, pad_token_id=0
    )
    no_dropout = dict(disable_dropout=True)  # GPT-2's dropout would make two training-mode passes differ
    AutoModelForCausalLM.from_config(config, dtype=torch.float64).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert absolute_position_tables(AutoModelForCausalLM.from_config(config)) == ["transformer.wpe"]
    dataset = real_prompts(2, offset=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = grpo_trainer(
            PrefixSharedGRPOTrainer,
            str(tmp_path),
            tokenizer,
            dataset,
            PrefixSharedGRPOConfig,
            verify_model=False,
            **no_dropout,
        )
    assert not ours.prefix_share_enabled and "absolute position" in ours.prefix_share_fallback
    assert any(issubclass(w.category, PrefixShareFallbackWarning) for w in caught)
    stock = grpo_trainer(GRPOTrainer, str(tmp_path), tokenizer, dataset, **no_dropout)
    inputs = generate_and_score(stock, generation_batch(dataset, 2))
    assert_equivalent(stock, ours, inputs, inputs)
    assert ours._metrics["train"]["prefix_share/token_ratio"][-1] == 1.0


def test_plain_rloo_config_and_error_mode(model_dir, tokenizer, tmp_path):
    dataset = real_prompts(2, offset=70)
    trainer = PrefixSharedRLOOTrainer(
        model=model_dir("llama"),
        reward_funcs=vowel_reward,
        args=online_args(RLOOConfig, per_device_train_batch_size=8),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert isinstance(trainer, RLOOTrainer) and trainer.prefix_share_enabled
    assert trainer.prefix_share_args.on_unsupported_model == "fallback"
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from trl_prefix_share import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="absolute position"):
        grpo_trainer(
            PrefixSharedGRPOTrainer,
            str(tmp_path),
            tokenizer,
            dataset,
            PrefixSharedGRPOConfig,
            on_unsupported_model="error",
        )

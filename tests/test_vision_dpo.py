"""Vision-language DPO: `PrefixSharedDPOTrainer` against stock `DPOTrainer` on image preference data.

Tiny Qwen2.5-VL, Qwen3-VL (multimodal RoPE, deepstack features), Gemma 3 (bidirectional attention inside an image,
sliding window) and LLaVA are built offline (`vision_setup.py`), in float64, on the generated charts-and-shapes set.
Loss, every gradient and every logged metric must match stock within 1e-5, with each image encoded once per pair.
Broken variants (no image blocks, 1-D positions, the wrong image) move the loss, so the tests can fail.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from equivalence import EQUIVALENCE_DTYPE, assert_equivalent, cpu_args, perturb, relative_difference
from trl import DPOConfig, DPOTrainer
from vision_setup import build_vision_model

from trl_prefix_share import PrefixSharedDPOConfig, PrefixSharedDPOTrainer
from trl_prefix_share.commands.bench.vision import ImageCounter
from trl_prefix_share.commands.image_preferences import image_preference_dataset
from trl_prefix_share.core.installer import PrefixShareFallbackWarning
from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.core.vision.model_kinds import vision_support
from trl_prefix_share.core.vision.placement import VISION_KEY

#: The key bias of an attention without rotary positions (the CLIP and SigLIP towers) has a zero gradient in exact
#: arithmetic (a softmax is unchanged by a constant added to every score of a row): both sides hold rounding noise
#: there (~1e-17 of the largest gradient in float64, ~1e-9 in float32), checked to be tiny rather than equal.
ZERO_GRADIENTS = r"vision_tower\..*k_proj\.bias$"
BATCH = 4


@pytest.fixture(scope="module")
def shapes():
    return {
        "conversational": image_preference_dataset(8, seed=3, conversational=True),
        "plain": image_preference_dataset(8, seed=4, conversational=False, image_placeholder="<image>"),
    }


@pytest.fixture(scope="module")
def tiny_models():
    return {}


def tiny(tiny_models, family: str):
    if family not in tiny_models:
        tiny_models[family] = build_vision_model(family, dtype=EQUIVALENCE_DTYPE)
    return tiny_models[family]


def make_trainer(trainer_cls, model_and_processor, dataset, quiet=True, **fields):
    model = copy.deepcopy(model_and_processor.model)
    config_cls = DPOConfig if trainer_cls is DPOTrainer else PrefixSharedDPOConfig
    args = cpu_args(config_cls, BATCH, **{"max_length": None, **fields})
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", UserWarning)
        return trainer_cls(
            model,
            ref_model=copy.deepcopy(model_and_processor.model),
            args=args,
            train_dataset=dataset,
            processing_class=model_and_processor.processor,
        )


def collate(trainer, dataset, indices):
    examples = [copy.deepcopy(dict(dataset[i])) for i in indices]
    return trainer._prepare_inputs(trainer.data_collator(examples))


CASES = [
    ("qwen2_vl", "conversational"),
    ("qwen2_5_vl", "conversational"),
    ("qwen3_vl", "conversational"),
    ("gemma3", "conversational"),
    ("llava", "plain"),
    ("llava_next", "conversational"),
]


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_dpo_matches_stock_with_each_image_encoded_once(tiny_models, shapes, family, layout):
    data = shapes[layout]
    model = tiny(tiny_models, family)
    stock = make_trainer(DPOTrainer, model, data)
    ours = make_trainer(PrefixSharedDPOTrainer, model, data)
    assert ours.prefix_share_fallback is None
    perturb(stock.model)
    perturb(ours.model)
    stock_images, our_images = ImageCounter(), ImageCounter()
    stock_images.watch(stock.model)
    our_images.watch(ours.model)
    indices = list(range(BATCH))
    our_batch = collate(ours, data, indices)
    assert our_batch[PACKED_KEY]["input_ids"].size(0) == 1  # all four pairs in one packed row
    assert_equivalent(stock, ours, collate(stock, data, indices), our_batch, zero_gradients=ZERO_GRADIENTS)
    # stock encodes every image for chosen and rejected (and again for the reference); ours once per pair
    assert stock_images.images == 2 * BATCH and our_images.images == BATCH


def one_question_over_images() -> Dataset:
    """Four pairs with one question: pairs 0 and 1 over the same image, pairs 2 and 3 over two other images."""
    base = image_preference_dataset(4, seed=7)
    rows = [dict(base[i]) for i in range(4)]
    question = [{"role": "user", "content": "Describe the picture in one sentence."}]
    for row in rows:
        row["prompt"] = question
    rows[1]["images"] = rows[0]["images"]
    return Dataset.from_list(rows)


def test_identical_text_with_different_images_is_never_shared(tiny_models):
    """Pairs 0 and 1: same question, same image (one document of four responses). Pairs 2 and 3: same question,
    different images (two documents). Grouped by prompt, still exactly stock's numbers."""
    data = one_question_over_images()
    model = tiny(tiny_models, "qwen2_5_vl")
    stock = make_trainer(DPOTrainer, model, data)
    ours = make_trainer(PrefixSharedDPOTrainer, model, data, group_by_prompt=True)
    perturb(stock.model)
    perturb(ours.model)
    batch = collate(ours, data, range(4))
    documents = batch[PACKED_KEY]["document_ids"]
    assert int(documents.max()) + 1 == 3
    assert batch[PACKED_KEY][VISION_KEY]["image_inputs"]["image_grid_thw"].size(0) == 3  # pair 1 reuses pair 0's
    assert_equivalent(stock, ours, collate(stock, data, range(4)), batch, zero_gradients=ZERO_GRADIENTS)


def test_the_prompt_sampler_keys_on_text_and_pixels(tiny_models):
    """`group_by_prompt` batches pairs by prompt text *and* image; length-sorted batches need lengths up front,
    which image data lacks, and are refused by name."""
    from trl_prefix_share.trainers.dpo.grouping import PromptGroupedSampler, vision_prompt_keys

    data = one_question_over_images()
    keys = vision_prompt_keys(data)
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3
    ours = make_trainer(PrefixSharedDPOTrainer, tiny(tiny_models, "llava"), data, group_by_prompt=True)
    sampler = ours._get_train_sampler()
    assert isinstance(sampler, PromptGroupedSampler)
    assert sorted(sorted(group) for group in sampler.groups) == [[0, 1], [2], [3]]
    by_length = make_trainer(PrefixSharedDPOTrainer, tiny(tiny_models, "llava"), data, length_grouped_batches=True)
    with pytest.raises(ValueError, match="vision data"):
        by_length._get_train_sampler()


@pytest.mark.parametrize("options", [{"share_prefix": False}, {"max_row_tokens": 200}])
def test_unshared_and_several_rows_match_stock(tiny_models, shapes, options):
    data = shapes["conversational"]
    model = tiny(tiny_models, "gemma3")
    stock = make_trainer(DPOTrainer, model, data)
    ours = make_trainer(PrefixSharedDPOTrainer, model, data, **options)
    perturb(stock.model)
    perturb(ours.model)
    batch = collate(ours, data, range(BATCH))
    if "max_row_tokens" in options:
        assert batch[PACKED_KEY]["input_ids"].size(0) > 1
    assert_equivalent(stock, ours, collate(stock, data, range(BATCH)), batch, zero_gradients=ZERO_GRADIENTS)


def policy_log_probs(trainer, batch) -> torch.Tensor:
    """The policy's per-token log-probs of the completions, called as TRL's DPO loss calls the model."""
    model_kwargs = {
        k: v for k, v in batch.items() if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
    }
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    trainer.model.eval()
    with torch.no_grad():
        outputs = trainer.model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
    return outputs.log_probs[labels[:, 1:] != -100]


@pytest.mark.parametrize("broken", ["wrong_image", "no_image_blocks", "text_positions"])
def test_broken_variants_move_the_log_probs(tiny_models, shapes, broken, monkeypatch):
    """Each rule the vision path keeps, dropped on purpose, moves the completions' log-probs far beyond float64
    noise (the kept rules match stock to ~1e-12 nats), so the equivalence tests above can fail."""
    family = {"wrong_image": "llava", "no_image_blocks": "gemma3", "text_positions": "qwen2_5_vl"}[broken]
    data = shapes["plain" if family == "llava" else "conversational"]
    ours = make_trainer(PrefixSharedDPOTrainer, tiny(tiny_models, family), data)
    perturb(ours.model)
    right = policy_log_probs(ours, collate(ours, data, range(BATCH)))
    batch = collate(ours, data, range(BATCH))  # a fresh batch: its layout builds its masks anew
    if broken == "wrong_image":
        images = batch[PACKED_KEY][VISION_KEY]["image_inputs"]
        images["pixel_values"] = images["pixel_values"].roll(1, dims=0)
    elif broken == "no_image_blocks":
        monkeypatch.setattr("trl_prefix_share.core.vision.forward.image_blocks", lambda token_types, layout: None)
    else:
        monkeypatch.setattr("trl_prefix_share.core.vision.forward._stock_3d_positions", lambda *a, **k: None)
    wrong = policy_log_probs(ours, batch)
    assert float((wrong - right).abs().max()) > 1e-3, broken


def test_short_training_with_lora_matches_stock(tiny_models, shapes):
    """Three optimizer steps of LoRA (language model and vision tower) on Qwen2.5-VL: the same logged losses."""
    from peft import LoraConfig

    data = shapes["conversational"]
    model = tiny(tiny_models, "qwen2_5_vl")
    logs = {}
    for trainer_cls in (DPOTrainer, PrefixSharedDPOTrainer):
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv"], init_lora_weights=False)
        args = cpu_args(DPOConfig, BATCH, max_length=None, max_steps=3, logging_steps=1, learning_rate=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer = trainer_cls(
                copy.deepcopy(model.model),
                args=args,
                train_dataset=data,
                processing_class=model.processor,
                peft_config=peft_config,
            )
        trainer.train()
        logs[trainer_cls] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    stock, ours = logs[DPOTrainer], logs[PrefixSharedDPOTrainer]
    assert len(stock) == 3 and len(set(stock)) > 1
    for a, e in zip(ours, stock, strict=True):
        assert relative_difference(torch.tensor(a), torch.tensor(e)) <= 1e-5, (ours, stock)


def test_trl_restrictions_with_images_stay(tiny_models, shapes):
    model = tiny(tiny_models, "llava")
    with pytest.raises(ValueError, match="keep_end"):
        make_trainer(PrefixSharedDPOTrainer, model, shapes["plain"], max_length=64, truncation_mode="keep_end")
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        make_trainer(PrefixSharedDPOTrainer, model, shapes["plain"], precompute_ref_log_probs=True)


def test_max_length_cutting_image_tokens_is_named(tiny_models, shapes):
    """LLaVA's 16 image tokens cut at 10: the forward names `max_length` (stock TRL fails on the same batch too)."""
    ours = make_trainer(PrefixSharedDPOTrainer, tiny(tiny_models, "llava"), shapes["plain"], max_length=10)
    batch = collate(ours, shapes["plain"], range(BATCH))
    with pytest.raises(ValueError, match="max_length"):
        ours.compute_loss(ours.model, batch)


def test_a_prefix_lm_model_falls_back_to_stock(shapes):
    """PaliGemma attends bidirectionally over the whole prompt: refused by its code (the text layers' check and the
    vision check, which reads its `token_type_ids` mask rule), trained as stock with a warning naming the reason."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from vision_setup import TEXT, TinyVisionModel, _tokenizer

    tokenizer = _tokenizer(["<image>"])
    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma", **TEXT, head_dim=8, vocab_size=len(tokenizer)),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=32,
    )
    processor = build_vision_model("llava").processor  # only the construction is exercised
    model = TinyVisionModel(PaliGemmaForConditionalGeneration(config), processor)
    assert "token_type_ids" in vision_support(model.model).reason
    with pytest.warns(PrefixShareFallbackWarning, match="bidirectional"):
        trainer = make_trainer(PrefixSharedDPOTrainer, model, shapes["plain"], quiet=False)
    assert trainer.prefix_share_fallback


def test_two_images_per_prompt_match_stock(tiny_models):
    """Each prompt holds two images of different sizes (different token counts per image on Qwen2.5-VL)."""
    base = image_preference_dataset(8, seed=11)
    wide = image_preference_dataset(4, seed=12, image_size=64)
    rows = [dict(base[i]) for i in range(BATCH)]
    for index, row in enumerate(rows):
        row["images"] = row["images"] + wide[index]["images"]
    data = Dataset.from_list(rows)
    model = tiny(tiny_models, "qwen2_5_vl")
    stock = make_trainer(DPOTrainer, model, data)
    ours = make_trainer(PrefixSharedDPOTrainer, model, data)
    perturb(stock.model)
    perturb(ours.model)
    batch = collate(ours, data, range(BATCH))
    assert batch[PACKED_KEY][VISION_KEY]["image_inputs"]["image_grid_thw"].size(0) == 2 * BATCH
    assert_equivalent(stock, ours, collate(stock, data, range(BATCH)), batch, zero_gradients=ZERO_GRADIENTS)


def test_reward_trainer_refuses_images(shapes, tokenizer):
    """TRL 1.16's reward trainer takes no images (it would drop them silently): ours says so and names the fix."""
    from trl_prefix_share import PrefixSharedRewardTrainer

    with pytest.raises(ValueError, match="takes no images"):
        PrefixSharedRewardTrainer(model="unused", train_dataset=shapes["conversational"], processing_class=tokenizer)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_float32_matches_stock(shapes, family):
    """The same in float32, as users train on a CPU: loss, gradients and metrics within 5e-5 (float32 kernel noise:
    2.2e-6 measured here; the text tests saw up to 1.17e-5 on another VM, see `equivalence.py`)."""
    model = build_vision_model(family, dtype=torch.float32)
    data = shapes["conversational"]
    stock = make_trainer(DPOTrainer, model, data)
    ours = make_trainer(PrefixSharedDPOTrainer, model, data)
    perturb(stock.model)
    perturb(ours.model)
    indices = range(BATCH)
    assert_equivalent(
        stock,
        ours,
        collate(stock, data, indices),
        collate(ours, data, indices),
        tolerance=5e-5,
        zero_gradients=ZERO_GRADIENTS,
    )


@pytest.mark.parametrize("window", [None, 6])
def test_image_blocks_are_the_same_rule_in_both_kernels(window):
    """Gemma 3's rule (causal OR same image, then the window) in the SDPA decomposition and in FlexAttention's
    `mask_mod` (eager on CPU), against one dense mask written out from the rule."""
    from trl_prefix_share.core.attention.flex_packed import packed_flex_attention
    from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout
    from trl_prefix_share.core.attention.sdpa_packed import packed_sdpa_attention
    from trl_prefix_share.core.layout import SequenceSpec, make_document, pack_documents

    generator = torch.Generator().manual_seed(0)
    documents = []
    for doc, (prompt, answers) in enumerate([(9, (3, 4)), (7, (5, 2, 3)), (6, (4,))]):
        shared = torch.randint(1, 50, (prompt,), generator=generator)
        specs = [
            SequenceSpec(torch.cat([shared, torch.randint(1, 50, (n,), generator=generator)]), prompt, 3 * doc + k)
            for k, n in enumerate(answers)
        ]
        documents.append(make_document(specs))
    packed = pack_documents(documents, num_virtual_rows=9, virtual_length=16, pad_token_id=0)
    layout = PackedAttentionLayout(packed, "sdpa")
    blocks = torch.full_like(packed["input_ids"], -1)
    blocks[0, 2:6] = 0  # an image inside the first prefix, another inside the second
    start = int((packed["document_ids"][0] == 1).nonzero()[0])
    blocks[0, start + 1 : start + 4] = 1
    layout.image_blocks = blocks
    heads, dim = 2, 8
    length = packed["input_ids"].size(1)
    query, key, value = (torch.randn(1, heads, length, dim, generator=generator, dtype=torch.float64) for _ in range(3))
    sdpa = packed_sdpa_attention(query, key, value, layout, None, 0.0, window)
    flex = packed_flex_attention(query, key, value, layout, None, window, compiled=False)

    doc, branch, pos = packed["document_ids"][0], packed["branch_ids"][0], packed["position_ids"][0]
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    same_image = (blocks[0][:, None] == blocks[0][None, :]) & (blocks[0][:, None] >= 0)
    allowed = (doc[:, None] == doc[None, :]) & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None]))
    allowed &= (k <= q) | same_image
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    allowed |= (doc[:, None] < 0) & (q == k)
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed).transpose(1, 2)
    real = doc >= 0
    assert torch.allclose(sdpa[0, real], dense[0, real], atol=1e-12)
    assert torch.allclose(flex[0, real].double(), dense[0, real], atol=1e-6)
    assert not torch.allclose(
        sdpa[0, 2:6],
        packed_sdpa_attention(query, key, value, PackedAttentionLayout(packed, "sdpa"), None, 0.0, window)[0, 2:6],
    )

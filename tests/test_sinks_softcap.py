"""Attention sinks (GPT-OSS) and logit soft-capping (Gemma 2) are served exactly, against the stock trainers.

GPT-OSS alternates sliding (window 16, shorter than these sequences) and full layers and adds a learned sink logit per
head to every softmax row; Gemma 2 soft-caps its attention logits (cap set to 1.0 here so the cap bites at tiny init:
the default 50 would leave ``tanh`` linear and a kernel that ignored it would pass).
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_dataset_rows, save_tiny_model
from equivalence import assert_equivalent, first_batch, perturb, relative_difference, tree_depth, trees_on_short_heads
from transformers import AutoModelForCausalLM

from trl_prefix_share.core.attention.flex_packed import packed_flex_attention
from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout
from trl_prefix_share.core.attention.sdpa_packed import packed_explicit_attention
from trl_prefix_share.core.layout import SequenceSpec, make_document, move_to_device, pack_documents
from trl_prefix_share.core.packing import PACKED_KEY

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
FAMILIES = {
    "gpt_oss": dict(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        num_local_experts=4,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    # Window longer than the rows: stock Gemma 2 (eager) turns float64 padded rows into NaN when a window is shorter
    # than the row (transformers 5.24; float32 is fine). Its windows with soft-capping are checked against each
    # sequence alone in tests/test_model_registry.py.
    "gemma2": dict(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4096,
        attn_logit_softcapping=1.0,
        query_pre_attn_scalar=8,
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """Factory: path of a saved tiny model (causal LM or 1-label classifier) of a family, in float64."""
    cache: dict[tuple[str, bool], str] = {}

    def get(family: str, reward: bool = False) -> str:
        if (family, reward) not in cache:
            directory = tmp_path_factory.mktemp(f"{family}-{'rm' if reward else 'lm'}")
            cache[(family, reward)] = save_tiny_model(directory, tokenizer, family, reward, **SMALL, **FAMILIES[family])
        return cache[(family, reward)]

    return get


@pytest.fixture(scope="module")
def hh_rows():
    return load_dataset_rows("hh_harmless", 8)


#: Gemma 2's eager attention takes its softmax in float32 even in a float64 model (`dtype=torch.float32`), so stock
#: carries float32 noise there: measured 1.35e-5 relative on the DPO loss. GPT-OSS keeps the model's dtype: 1e-5.
TOLERANCE = {"gpt_oss": None, "gemma2": 1e-4}


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_matches_stock(family, saved, tokenizer, hh_rows):
    from test_dpo_equivalence import make_pair

    stock, ours = make_pair(saved(family), tokenizer, hh_rows)
    assert ours.prefix_share_fallback is None
    trees_on_short_heads(ours)
    stock_batch, our_batch = first_batch(stock, 4), first_batch(ours, 4)
    if family == "gpt_oss":
        assert stock_batch["input_ids"].size(1) > 2 * 16  # past the sliding window
    assert our_batch[PACKED_KEY]["input_ids"].numel() < stock_batch["input_ids"].numel()
    assert tree_depth(our_batch[PACKED_KEY]) >= 2  # hh's prompts merged below their common "\n\nHuman:"
    assert_equivalent(stock, ours, stock_batch, our_batch, tolerance=TOLERANCE[family])


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_gpt_oss_orpo_and_simpo_match_stock(kind, saved, tokenizer):
    from test_orpo_cpo import assert_equivalent as paired_equivalent
    from test_orpo_cpo import first_batch as paired_batch
    from test_orpo_cpo import make_pair, short_rows

    config = {"loss_type": "simpo", "cpo_alpha": 0.0} if kind == "cpo" else {}
    stock, ours = make_pair(kind, saved("gpt_oss"), tokenizer, short_rows("hh_helpful", 8), **config)
    assert ours.prefix_share_fallback is None
    trees_on_short_heads(ours)
    ours_batch = paired_batch(ours)
    assert tree_depth(ours_batch[PACKED_KEY]) >= 2
    paired_equivalent(stock, ours, paired_batch(stock), ours_batch)


def test_gpt_oss_reward_matches_stock(saved, tokenizer, hh_rows):
    from test_reward import compare_first_batch, make_pair

    stock, ours = make_pair(saved("gpt_oss", reward=True), tokenizer, hh_rows)
    assert ours.prefix_share_fallback is None
    compare_first_batch(stock, ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_switched_model_generates_like_stock(family, saved, tokenizer):
    """Plain batches of a switched model (generation with a cache, padding) take the explicit-softmax dense path."""
    from trl.trainer.utils import add_fused_lm_head

    from trl_prefix_share.core.model_support import enable_prefix_sharing
    from trl_prefix_share.core.packed_forward import install_packed_forward  # noqa: F401 - enable installs it

    # float32: stock Gemma 2 turns float64 left padding into NaN (its float32 softmax of a float64 -inf-like mask).
    load = dict(dtype=torch.float32, experts_implementation="eager")
    stock = AutoModelForCausalLM.from_pretrained(saved(family), **load)
    ours = AutoModelForCausalLM.from_pretrained(saved(family), **load)
    for model in (stock, ours):
        perturb(model)
        model.eval()
    add_fused_lm_head(ours)
    enable_prefix_sharing(ours, "sdpa")
    tokenizer.padding_side = "left"
    batch = tokenizer(
        ["Hello there, how", "A much longer prompt that needs no padding at all"], return_tensors="pt", padding=True
    )
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(stock.generate(**batch, **kwargs), ours.generate(**batch, **kwargs))
        expected = stock(**batch).logits
        actual = ours(**batch).logits
    real = batch["attention_mask"].bool()
    assert relative_difference(actual[real], expected[real]) <= 1e-5


def packed_probe_layout(device: str = "cpu", dtype: torch.dtype = torch.float64):
    """A packed layout with two documents (one with three branches) and random q/k/v/sinks on `device`."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(1, 50, (n,), generator=generator)

    prompt = tokens(9)
    sequences = [SequenceSpec(torch.cat([prompt, tokens(n)]), 9, row) for row, n in enumerate((5, 7, 3))]
    documents = [make_document(sequences), make_document([SequenceSpec(tokens(11), 6, 3)])]
    packed = move_to_device(pack_documents(documents, num_virtual_rows=4, virtual_length=20, pad_token_id=0), device)
    layout = PackedAttentionLayout(packed, "sdpa")
    rows, length = packed["input_ids"].shape

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)

    query, key, value = draw(rows, 4, length, 8, scale=2), draw(rows, 2, length, 8, scale=2), draw(rows, 2, length, 8)
    return layout, query, key, value, draw(4), packed["document_ids"] >= 0


def test_flex_kernel_applies_softcap_and_sinks_like_the_cpu_kernel():
    """FlexAttention (uncompiled, forward: CPU has no FlexAttention backward) with the soft-cap `score_mod` and the
    sink rescale `out * sigmoid(lse - sink)` equals the explicit-softmax CPU path on a packed layout with two documents,
    one of them with three branches; dropping either term moves the output far beyond the agreement."""
    layout, query, key, value, sinks, real = packed_probe_layout()
    for window in (None, 6):
        explicit = packed_explicit_attention(query, key, value, layout, None, 0.0, window, softcap=1.5, sinks=sinks)
        flex = packed_flex_attention(query, key, value, layout, None, window, compiled=False, softcap=1.5, sinks=sinks)
        assert relative_difference(flex[real], explicit[real]) <= 1e-10
        no_sinks = packed_explicit_attention(query, key, value, layout, None, 0.0, window, softcap=1.5)
        no_cap = packed_explicit_attention(query, key, value, layout, None, 0.0, window, sinks=sinks)
        assert relative_difference(no_sinks[real], explicit[real]) > 1e-2
        assert relative_difference(no_cap[real], explicit[real]) > 1e-2

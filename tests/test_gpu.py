"""CUDA path (skipped without a GPU): FlexAttention kernel, fp32 exactness and bf16 within bf16's own error.

bf16 cannot match bit for bit (different kernels round differently), so the bf16 check is relative to bf16 itself:
our bf16 loss and gradients must be as close to stock's fp32 result as stock's own bf16 run is (within a factor)."""

from __future__ import annotations

import re
import tempfile

import pytest
import torch
from conftest import load_dataset_rows
from equivalence import RELATIVE_TOLERANCE, first_batch, loss_and_grads, relative_difference
from trl import DPOConfig, DPOTrainer

from trl_prefix_share import PrefixSharedDPOTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def gpu_args(bf16: bool) -> DPOConfig:
    return DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=8,
        report_to="none",
        max_length=256,
        seed=0,
        bf16=bf16,
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
    )


def run(cls, model_path: str, tokenizer, rows, bf16: bool):
    trainer = cls(model=model_path, args=gpu_args(bf16), train_dataset=rows, processing_class=tokenizer)
    loss, grads, _ = loss_and_grads(trainer, first_batch(trainer, 8))
    return trainer, loss.float(), {name: grad.float() for name, grad in grads.items()}


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_flex_kernel_fp32_matches_stock(family, model_dir, tokenizer):
    rows = load_dataset_rows("hh_harmless", 8)
    _, stock_loss, stock_grads = run(DPOTrainer, model_dir(family), tokenizer, rows, bf16=False)
    ours, our_loss, our_grads = run(PrefixSharedDPOTrainer, model_dir(family), tokenizer, rows, bf16=False)
    assert ours.prefix_share_kernel == "flex"
    # fp32 with TF32 off: only summation order differs (FlexAttention vs one padded SDPA call). The 10x margin over
    # the CPU bound is a guess until these tests first run on a GPU; a wrong context is ~1e-2.
    assert relative_difference(our_loss, stock_loss) <= 10 * RELATIVE_TOLERANCE
    for name, expected in stock_grads.items():
        assert relative_difference(our_grads[name], expected) <= 10 * RELATIVE_TOLERANCE, name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_error_is_bf16s_own(family, model_dir, tokenizer):
    rows = load_dataset_rows("hh_harmless", 8)
    _, reference_loss, reference_grads = run(DPOTrainer, model_dir(family), tokenizer, rows, bf16=False)
    _, stock_loss, stock_grads = run(DPOTrainer, model_dir(family), tokenizer, rows, bf16=True)
    _, our_loss, our_grads = run(PrefixSharedDPOTrainer, model_dir(family), tokenizer, rows, bf16=True)
    assert torch.isfinite(our_loss)
    stock_error = relative_difference(stock_loss, reference_loss)
    assert relative_difference(our_loss, reference_loss) <= 3 * stock_error + 1e-3
    stock_grad_error = sum(relative_difference(stock_grads[n], g) for n, g in reference_grads.items())
    our_grad_error = sum(relative_difference(our_grads[n], g) for n, g in reference_grads.items())
    assert our_grad_error <= 3 * stock_grad_error + 1e-2


def test_grpo_flex_kernel_fp32_matches_stock(model_dir, tokenizer):
    """GRPO on the CUDA path: the generation step's reference log-probs and the policy step's loss and gradients."""
    from equivalence import assert_equivalent
    from online_setup import generate_and_score, generation_batch, online_args, real_prompts, vowel_reward
    from trl import GRPOConfig, GRPOTrainer

    from trl_prefix_share import PrefixSharedGRPOTrainer

    dataset = real_prompts(2)

    def make(cls):
        args = online_args(
            GRPOConfig,
            per_device_train_batch_size=8,
            beta=0.1,
            use_cpu=False,
            model_init_kwargs={"dtype": torch.float32},
        )
        trainer = cls(
            model=model_dir("qwen2"),
            reward_funcs=vowel_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.current_gradient_accumulation_steps = 1
        return trainer

    stock, ours = make(GRPOTrainer), make(PrefixSharedGRPOTrainer)
    assert ours.prefix_share_kernel == "flex"
    batch = generation_batch(dataset, 2)
    expected, actual = generate_and_score(stock, batch), generate_and_score(ours, batch)
    mask = expected["completion_mask"].bool()
    ref = relative_difference(actual["ref_per_token_logps"][mask], expected["ref_per_token_logps"][mask])
    assert ref <= 10 * RELATIVE_TOLERANCE  # same 10x guess as the DPO fp32 check above
    assert_equivalent(stock, ours, expected, expected, tolerance=10 * RELATIVE_TOLERANCE)


def test_compiled_flex_softcap_and_sinks_match_the_explicit_kernel():
    """The compiled FlexAttention path with a soft-cap `score_mod` and the sink rescale (forward and backward, the
    part CPU cannot run) against the explicit-softmax kernel on the same packed layout."""
    from test_sinks_softcap import packed_probe_layout

    from trl_prefix_share.core.attention.flex_packed import packed_flex_attention
    from trl_prefix_share.core.attention.sdpa_packed import packed_explicit_attention

    layout, query, key, value, sinks, real = packed_probe_layout("cuda", torch.float32)
    inputs = [t.requires_grad_() for t in (query, key, value, sinks)]
    flex = packed_flex_attention(*inputs[:3], layout, None, 6, compiled=True, softcap=1.5, sinks=inputs[3])
    flex_grads = torch.autograd.grad(flex[real].square().sum(), inputs)
    explicit = packed_explicit_attention(*inputs[:3], layout, None, 0.0, 6, softcap=1.5, sinks=inputs[3])
    explicit_grads = torch.autograd.grad(explicit[real].square().sum(), inputs)
    assert relative_difference(flex[real], explicit[real]) <= 10 * RELATIVE_TOLERANCE
    for got, expected in zip(flex_grads, explicit_grads, strict=True):
        assert relative_difference(got, expected) <= 10 * RELATIVE_TOLERANCE


@pytest.mark.parametrize("family", ["qwen3_5_text", "kimi_linear", "nemotron_h"])
def test_hybrid_flex_kernel_fp32_matches_stock(family, tokenizer, tmp_path):
    """Hybrids on CUDA: FlexAttention for the attention layers, the segmented mixers (transformers' CUDA kernels
    where installed, which take the handed-in states too; Qwen3.5's and Kimi-Linear's delta rules through fla's
    variable-length kernels when fla is installed, as `make gpu-check` does) for the others. Gradients below 1e-2 of
    the largest are held against that floor: the scans round in float32 and chunk a packed sequence differently (see
    tests/test_hybrid_mixers.py)."""
    from test_hybrid_mixers import FAMILIES, SMALL
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(FAMILIES[family])
    config = AutoConfig.for_model(
        fields.pop("model_type", family),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **{**SMALL, **fields},
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    rows = load_dataset_rows("hh_harmless", 8)
    _, stock_loss, stock_grads = run(DPOTrainer, str(tmp_path), tokenizer, rows, bf16=False)
    ours, our_loss, our_grads = run(PrefixSharedDPOTrainer, str(tmp_path), tokenizer, rows, bf16=False)
    assert ours.prefix_share_kernel == "flex" and ours.prefix_share_fallback is None
    from trl_prefix_share.core.mixers import varlen

    kind = {"qwen3_5_text": "gated_delta", "kimi_linear": "kimi_delta"}.get(family)
    kernel = None if kind is None else varlen.installed_fla_kernel(kind)
    if kernel is not None:  # fla's variable-length kernel ran, and its first-call check passed
        assert varlen.varlen_checks()[(kernel, torch.float32)].passed
    assert relative_difference(our_loss, stock_loss) <= 10 * RELATIVE_TOLERANCE
    floor = 1e-2 * max(grad.norm().item() for grad in stock_grads.values())
    for name, expected in stock_grads.items():
        difference = (our_grads[name] - expected).norm().item() / max(expected.norm().item(), floor)
        assert difference <= 10 * RELATIVE_TOLERANCE, name


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_vision_flex_kernel_fp32_matches_stock(family):
    """Image preferences on CUDA: FlexAttention with Gemma 3's image blocks in its `mask_mod`, Qwen2.5-VL's gathered
    3-D positions; each image encoded once. fp32, the CPU tests' bound times ten (CUDA kernels)."""
    from test_vision_dpo import ZERO_GRADIENTS, collate, make_trainer
    from vision_setup import build_vision_model

    from trl_prefix_share.commands.image_preferences import image_preference_dataset

    data = image_preference_dataset(8, seed=3)
    tiny = build_vision_model(family, dtype=torch.float32)
    stock = make_trainer(DPOTrainer, tiny, data, use_cpu=False)
    ours = make_trainer(PrefixSharedDPOTrainer, tiny, data, use_cpu=False)
    assert ours.prefix_share_kernel == "flex" and ours.prefix_share_fallback is None
    stock_loss, stock_grads, _ = loss_and_grads(stock, collate(stock, data, range(4)))
    our_loss, our_grads, _ = loss_and_grads(ours, collate(ours, data, range(4)))
    assert relative_difference(our_loss, stock_loss) <= 10 * RELATIVE_TOLERANCE
    for name, expected in stock_grads.items():
        if not re.search(ZERO_GRADIENTS, name):  # zero in exact arithmetic: noise on both sides
            assert relative_difference(our_grads[name], expected) <= 10 * RELATIVE_TOLERANCE, name


@pytest.mark.parametrize("kind", ["gated_delta", "kimi_delta"])
def test_fla_variable_length_kernel_matches_the_torch_kernel(kind):
    """flash-linear-attention's variable-length gated delta rule and Kimi delta attention (when installed) on a packed
    layout with prefixes, branches, an unshared document and row padding: outputs and gradients against the torch
    ragged kernel, fp32, and the first-call check that guards it (which must fail for a kernel whose boundaries are
    dropped)."""
    from test_varlen_kernel import tree_plan

    from trl_prefix_share.core.mixers import ragged_kernels, varlen

    kernel = varlen.installed_fla_kernel(kind)
    if kernel is None:
        pytest.skip("flash-linear-attention is not installed (requirements/fla.txt)")
    plan, document_ids = tree_plan()
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    tokens = document_ids.numel()

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, device=device)).requires_grad_()

    key_heads, decay_shape = (2, (4,)) if kind == "gated_delta" else (4, (4, 16))  # Kimi: a decay per key channel
    inputs = [randn(1, tokens, key_heads, 16), randn(1, tokens, key_heads, 16), randn(1, tokens, 4, 16)]
    inputs += [(-torch.rand(1, tokens, *decay_shape, generator=generator, device=device)).requires_grad_()]
    inputs += [torch.rand(1, tokens, 4, generator=generator, device=device).requires_grad_()]
    weights = torch.randn(1, tokens, 4, 16, generator=generator, device=device)
    expected = ragged_kernels.ragged_gated_delta_rule(*inputs, plan.chunk_schedule(device), use_qk_l2norm=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    got = varlen.varlen_gated_delta_rule(kernel, *inputs, plan.varlen_levels(device), use_qk_l2norm=True)
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    assert relative_difference(got, expected) <= 1e-3
    for grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        assert relative_difference(grad, expected_grad) <= 1e-3
    assert got[0, document_ids.reshape(-1).to(device) < 0].abs().max() == 0

    def without_boundaries(*args, cu_seqlens=None, initial_state=None, **kwargs):
        out, final = kernel(*args, cu_seqlens=cu_seqlens[[0, -1]], initial_state=None, **kwargs)
        return out, final.expand(len(cu_seqlens) - 1, *final.shape[1:]).contiguous()

    varlen._CHECKS.clear()
    detached = [x.detach() for x in inputs]
    varlen.checked_varlen_gated_delta_rule(without_boundaries, plan, *detached, use_qk_l2norm=True)
    varlen.checked_varlen_gated_delta_rule(kernel, plan, *detached, use_qk_l2norm=True)
    checks = varlen.varlen_checks()
    assert not checks[(without_boundaries, torch.float32)].passed
    assert checks[(kernel, torch.float32)].passed, checks

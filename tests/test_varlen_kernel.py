"""The gated delta rule through a variable-length kernel (flash-linear-attention's API), on the CPU with a stand-in.

fla's kernels run on CUDA only (`tests/test_gpu.py` runs the real one there). Here the path around it is held: a
stand-in with fla's API (``cu_seqlens``, one initial and one final state per sequence) computes each sequence alone
with transformers' own torch kernel, and the unpadded run, its per-depth calls, the scatter back and the first-call
check must give stock's loss and gradients through it. Two planted stand-ins, one that ignores the boundaries (every
packed document's state leaks into the next) and one that drops the handed-in states (every branch from zero), must
be caught by the first-call check, which then falls back to the torch kernel: stock's results still.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import load_dataset_rows
from equivalence import RELATIVE_TOLERANCE, first_batch, loss_and_grads, relative_difference
from test_hybrid_mixers import (
    compare,
    count_runs,
    dpo_pair,
    family_saver,
    one_level_span_ends,
    run_kernel_in_float64,
)

from trl_prefix_share.core.mixers import ragged, ragged_kernels, varlen
from trl_prefix_share.core.mixers.ragged_plan import build_ragged_plan


def per_sequence_kernel(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
    cu_seqlens=None, **kwargs,
):  # fmt: skip
    """fla's variable-length API, each sequence computed alone by transformers' torch kernel from its own state (the
    gated delta rule's, or Kimi-Linear's for a decay per key channel)."""
    import transformers.models.kimi_linear.modeling_kimi_linear as kimi_linear
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    assert scale is None and not kwargs and q.size(0) == 1
    reference = kimi_linear.chunk_kimi_delta_attention if g.dim() == 4 else qwen3_5.torch_chunk_gated_delta_rule
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        out, final = reference(
            *(x[:, start:end] for x in (q, k, v, g, beta)),
            initial_state=None if initial_state is None else initial_state[index : index + 1],
            output_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )
        outputs.append(out)
        finals.append(final)
    return torch.cat(outputs, dim=1), torch.cat(finals) if output_final_state else None


def ignores_boundaries(q, k, v, g, beta, cu_seqlens=None, initial_state=None, **kwargs):
    """Planted: the boundaries are not passed on, so the depth's segments run as one sequence."""
    whole = cu_seqlens[[0, -1]]
    first = None if initial_state is None else initial_state[:1]
    out, final = per_sequence_kernel(q, k, v, g, beta, cu_seqlens=whole, initial_state=first, **kwargs)
    return out, final.expand(len(cu_seqlens) - 1, *final.shape[1:])


def drops_initial_states(q, k, v, g, beta, initial_state=None, **kwargs):
    """Planted: the handed-in states are ignored, so every branch starts from zero."""
    return per_sequence_kernel(q, k, v, g, beta, initial_state=None, **kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """Factory: path of a saved tiny float64 hybrid (Qwen3.5: gated delta; Kimi-Linear: Kimi delta), by family."""
    return family_saver(tmp_path_factory, tokenizer)


@pytest.fixture(scope="module")
def hh_rows():
    return load_dataset_rows("hh_harmless", 8)


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Each test starts with no first-call check made in this process."""
    monkeypatch.setattr(varlen, "_CHECKS", {})


def use_kernel(monkeypatch, kernel) -> dict[str, int]:
    """Route the unpadded run's gated delta rule to ``kernel`` (as on CUDA with fla); count its calls."""
    calls = {"kernel": 0}

    def counted(*args, **kwargs):
        calls["kernel"] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(ragged, "varlen_kernel_for", lambda device, kind="gated_delta": counted)
    return calls


def test_only_cuda_takes_the_variable_length_kernel(monkeypatch):
    """The CPU keeps the torch kernel even with a kernel installed; the switch turns it off on CUDA; a kernel that
    does not take the variable-length keywords is not used."""
    monkeypatch.setattr(varlen, "installed_fla_kernel", lambda kind="gated_delta": per_sequence_kernel)
    assert varlen.varlen_kernel_for(torch.device("cpu")) is None
    assert varlen.varlen_kernel_for(torch.device("cuda")) is per_sequence_kernel
    monkeypatch.setenv(varlen.FLA_SWITCH, "0")
    assert varlen.varlen_kernel_for(torch.device("cuda")) is None
    assert varlen.takes_varlen_keywords(per_sequence_kernel)
    assert not varlen.takes_varlen_keywords(lambda q, k, v, g, beta, initial_state=None: None)


def tree_plan():
    """Row 0: a prefix of 70 with branches of 5 and 130, an unshared document of 3; row 1: a prefix of 2 with a
    branch of 66, then padding (the plan of `test_ragged_kernels_match_transformers_per_segment`)."""
    document_ids = torch.full((2, 208), -1)
    branch_ids = torch.full((2, 208), -1)
    document_ids[0], document_ids[0, 205:] = 0, 1
    branch_ids[0, :70], branch_ids[0, 70:75], branch_ids[0, 75:205], branch_ids[0, 205:] = 0, 1, 2, 1
    document_ids[1, :68], branch_ids[1, :2], branch_ids[1, 2:68] = 2, 0, 1
    return build_ragged_plan(document_ids, branch_ids, one_level_span_ends(document_ids, branch_ids)), document_ids


def test_per_depth_calls_equal_the_torch_kernel(monkeypatch):
    """Outputs and gradients of every input through the per-depth variable-length calls equal the torch ragged
    kernel's (float64): roots in one call, branches from their parents' final states in the next, the scatter back,
    zeros on row padding; the depths' boundaries are the segments'."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    run_kernel_in_float64(monkeypatch, qwen3_5)
    plan, document_ids = tree_plan()
    levels = plan.varlen_levels(torch.device("cpu"))
    assert [c.tolist() for c in levels.cu_seqlens] == [[0, 70, 73, 75], [0, 5, 135, 201]]
    assert [r.tolist() for r in levels.parent_rank[1:]] == [[0, 0, 2]]
    generator = torch.Generator().manual_seed(0)
    tokens = document_ids.numel()

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    inputs = [randn(1, tokens, 2, 8), randn(1, tokens, 2, 8), randn(1, tokens, 4, 8)]
    inputs += [(-torch.rand(1, tokens, 4, generator=generator)).double().requires_grad_()]
    inputs += [torch.rand(1, tokens, 4, generator=generator).double().requires_grad_()]
    weights = torch.randn(1, tokens, 4, 8, generator=generator, dtype=torch.float64)
    schedule = plan.chunk_schedule(torch.device("cpu"))
    expected = ragged_kernels.ragged_gated_delta_rule(*inputs, schedule, use_qk_l2norm=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    got = varlen.varlen_gated_delta_rule(per_sequence_kernel, *inputs, levels, use_qk_l2norm=True)
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert got[0, document_ids.reshape(-1) < 0].abs().max() == 0


@pytest.mark.parametrize("family", ["qwen3_5_text", "kimi_linear"])
def test_dpo_through_the_variable_length_kernel_matches_stock(family, saved, tokenizer, hh_rows, monkeypatch):
    """DPO with the delta rule on the variable-length path (Qwen3.5's gated delta rule, fla's
    ``chunk_gated_delta_rule``; Kimi-Linear's per-channel decay, fla's ``chunk_kda``), prefix trees on hh's template
    heads, so three depths: stock's loss, gradients and metrics; the first-call check passes and the kernel is called
    per depth in every mixer forward."""
    calls = use_kernel(monkeypatch, per_sequence_kernel)
    stock, ours = dpo_pair(saved, family, tokenizer, hh_rows, prefix_tree_min_shared_tokens=2)
    runs = count_runs(monkeypatch)
    compare(stock, ours, first_batch(stock, 4), first_batch(ours, 4))
    assert runs["run_ragged"] > 0 and calls["kernel"] >= 2 * runs["run_ragged"]
    (check,) = varlen.varlen_checks().values()
    assert check.passed and check.difference < 1e-5, check


@pytest.mark.parametrize("fault", [ignores_boundaries, drops_initial_states], ids=lambda f: f.__name__)
def test_a_kernel_that_leaks_state_is_caught(fault, saved, tokenizer, hh_rows, monkeypatch, caplog):
    """The first-call check catches a kernel that loses the boundaries or the handed-in states (the known trap of
    variable-length kernels), warns, and the process goes back to the torch kernel: stock's loss still. Without the
    check the fault moves the loss by more than 1e-2."""
    stock, ours = dpo_pair(saved, "qwen3_5_text", tokenizer, hh_rows)
    expected, _, _ = loss_and_grads(stock, first_batch(stock, 4))
    with monkeypatch.context() as patch:  # the fault unchecked: what the check guards against
        patch.setattr(varlen, "_tolerance", lambda dtype: float("inf"))
        use_kernel(patch, fault)
        broken, _, _ = loss_and_grads(ours, first_batch(ours, 4))
    assert relative_difference(broken, expected) > 1e-2
    varlen._CHECKS.clear()
    calls = use_kernel(monkeypatch, fault)
    with caplog.at_level(logging.WARNING, logger=varlen.__name__):
        loss, _, _ = loss_and_grads(ours, first_batch(ours, 4))
    assert calls["kernel"] > 0
    (check,) = varlen.varlen_checks().values()
    assert not check.passed and check.difference > varlen.VARLEN_CHECK_TOLERANCE[torch.float64]
    assert "differs from the exact torch kernel" in caplog.text
    assert relative_difference(loss, expected) <= RELATIVE_TOLERANCE


def test_a_kernel_that_fails_on_its_first_call_falls_back(saved, tokenizer, hh_rows, monkeypatch, caplog):
    """A kernel that raises on its first call (a dtype or build it cannot take) is warned about and never called
    again; the step runs on the torch kernel: stock's loss."""
    stock, ours = dpo_pair(saved, "qwen3_5_text", tokenizer, hh_rows)
    expected, _, _ = loss_and_grads(stock, first_batch(stock, 4))

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this dtype")

    calls = use_kernel(monkeypatch, broken)
    with caplog.at_level(logging.WARNING, logger=varlen.__name__):
        loss, _, _ = loss_and_grads(ours, first_batch(ours, 4))
    assert calls["kernel"] == 1 and "failed on its first call (RuntimeError" in caplog.text
    assert relative_difference(loss, expected) <= RELATIVE_TOLERANCE

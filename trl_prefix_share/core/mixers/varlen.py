"""Delta rules over packed segments through flash-linear-attention's variable-length kernels (CUDA).

On CUDA with flash-linear-attention (fla) installed, the unpadded run (`ragged`) hands its chunked gated delta rule to
fla's ``chunk_gated_delta_rule`` (Kimi delta attention to fla's ``chunk_kda``, the same API with a decay per key
channel) instead of the torch kernel in `ragged_kernels`: fla takes many sequences laid end to
end in one row (``cu_seqlens``) with one initial state per sequence, and returns one final state per sequence. A
packed layout's segments are a tree (`ragged_plan`), so the scan runs one tree depth at a time: the roots (prefixes
and unshared documents) from a zero state in one call, then every branch from its parent's final state in the next.
Each call sees only its depth's tokens, gathered in segment order, and its outputs are scattered back.

The trap of variable-length kernels is documents leaking state into each other when the boundaries are not passed,
are overwritten, or a branch is not handed its prefix's state. Here the boundaries are always this layout's own
(the forward's own ``cu_seqlens`` makes the ragged call refuse), and the first call in a process for each precision is
checked against the torch kernel on the same inputs: a result off by more than `VARLEN_CHECK_TOLERANCE` of its scale
logs a warning and sends the process back to the torch kernel (exact, token-proportional, slower). The switch
``TRL_PREFIX_SHARE_FLA=0`` turns the fla path off.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trl_prefix_share.core.mixers.ragged_kernels import ragged_gated_delta_rule
from trl_prefix_share.core.mixers.ragged_plan import DELTA_CHUNK, RaggedPlan, VarlenLevels

logger = logging.getLogger(__name__)

#: Environment switch: "0" keeps the torch kernel on CUDA even where fla is installed.
FLA_SWITCH = "TRL_PREFIX_SHARE_FLA"
#: The first fla call per precision must agree with the torch kernel to this fraction of the output's largest value.
#: fla computes in float32 with TF32 products on recent GPUs and in bf16 tiles for bf16 inputs; a leaked or lost state
#: moves outputs by their own size. Set from those two facts: no GPU has run this check yet.
VARLEN_CHECK_TOLERANCE = {torch.float32: 1e-2, torch.float64: 1e-2}
HALF_PRECISION_TOLERANCE = 5e-2
#: fla's kernel for each mixer kind: (module, function).
FLA_KERNELS = {
    "gated_delta": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    "kimi_delta": ("fla.ops.kda", "chunk_kda"),
}
#: The keywords a variable-length kernel must take for this path to call it.
_REQUIRED_KEYWORDS = ("initial_state", "output_final_state", "cu_seqlens", "use_qk_l2norm_in_kernel", "scale")


@dataclass(frozen=True)
class VarlenCheck:
    """The first-call comparison of a kernel against the torch kernel: its relative difference and verdict."""

    dtype: torch.dtype
    difference: float
    passed: bool


#: Per (kernel, dtype): the first call's check. A failed one keeps that kernel off for the process.
_CHECKS: dict[tuple[Callable, torch.dtype], VarlenCheck] = {}


@functools.cache
def installed_fla_kernel(kind: str = "gated_delta") -> Callable | None:
    """fla's chunked kernel for a mixer kind if it is importable and takes the variable-length keywords; else None."""
    module_name, function_name = FLA_KERNELS[kind]
    try:
        kernel = getattr(importlib.import_module(module_name), function_name)
    except Exception:  # not installed, or its triton import fails (a CPU-only torch)
        return None
    return kernel if takes_varlen_keywords(kernel) else None


def takes_varlen_keywords(kernel: Callable) -> bool:
    try:
        parameters = inspect.signature(kernel).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in _REQUIRED_KEYWORDS)


def varlen_kernel_for(device: torch.device, kind: str = "gated_delta") -> Callable | None:
    """The variable-length kernel for a mixer kind's tensors on ``device``: fla's on CUDA when installed and on."""
    if device.type != "cuda" or os.environ.get(FLA_SWITCH, "1") == "0":
        return None
    return installed_fla_kernel(kind)


def varlen_checks() -> dict[tuple[Callable, torch.dtype], VarlenCheck]:
    """The first-call checks made so far in this process (for logs and tests)."""
    return dict(_CHECKS)


def varlen_gated_delta_rule(
    kernel: Callable,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    levels: VarlenLevels,
    use_qk_l2norm: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """The delta rule's outputs ``[1, N, H_v, d_v]`` over every segment of ``levels`` through ``kernel`` (fla's API),
    one call per tree depth; arguments as `ragged_kernels.ragged_gated_delta_rule` (``g`` per head or per channel).
    Key heads are repeated to the value heads first (each serving consecutive ones), so no grouping convention of the
    kernel is relied on."""
    value_heads = value.size(2)
    if key.size(2) != value_heads:
        repeat = value_heads // key.size(2)
        query, key = query.repeat_interleave(repeat, dim=2), key.repeat_interleave(repeat, dim=2)
    out = value.new_zeros((value.size(1), value_heads, value.size(-1)))
    final_states = None
    for depth, tokens in enumerate(levels.tokens):
        initial = None if depth == 0 else final_states[levels.parent_rank[depth]]
        scanned, final_states = kernel(
            *(x[:, tokens] for x in (query, key, value, g, beta)),
            scale=scale,
            initial_state=initial,
            output_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
            cu_seqlens=levels.cu_seqlens[depth],
        )
        out = out.index_copy(0, tokens, scanned[0].to(out.dtype))
    return out[None].to(query.dtype)


def _tolerance(dtype: torch.dtype) -> float:
    return VARLEN_CHECK_TOLERANCE.get(dtype, HALF_PRECISION_TOLERANCE)


def _relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float(((got.float() - expected.float()).abs().max() / scale).item()) if expected.numel() else 0.0


def checked_varlen_gated_delta_rule(
    kernel: Callable,
    plan: RaggedPlan,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    use_qk_l2norm: bool,
    scale: float | None = None,
    chunk: int = DELTA_CHUNK,
) -> torch.Tensor:
    """``kernel``'s result where its first call in this process (per precision) ran and agreed with the torch kernel;
    the torch kernel's where it failed or did not agree (warned once)."""
    check = _CHECKS.get((kernel, query.dtype))
    if check is not None and not check.passed:
        return ragged_gated_delta_rule(
            query, key, value, g, beta, plan.chunk_schedule(query.device, chunk), use_qk_l2norm, scale
        )
    levels = plan.varlen_levels(query.device)
    if check is not None:
        return varlen_gated_delta_rule(kernel, query, key, value, g, beta, levels, use_qk_l2norm, scale)
    schedule = plan.chunk_schedule(query.device, chunk)
    try:
        out = varlen_gated_delta_rule(kernel, query, key, value, g, beta, levels, use_qk_l2norm, scale)
    except Exception as error:  # a kernel that cannot take these inputs (dtype, shapes, its Triton build)
        _CHECKS[(kernel, query.dtype)] = VarlenCheck(query.dtype, float("inf"), False)
        logger.warning(
            "the variable-length delta kernel %s failed on its first call (%s: %s); using the exact torch kernel "
            "for the rest of this process.",
            getattr(kernel, "__module__", kernel),
            type(error).__name__,
            error,
        )
        return ragged_gated_delta_rule(query, key, value, g, beta, schedule, use_qk_l2norm, scale)
    with torch.no_grad():
        expected = ragged_gated_delta_rule(
            *(x.detach() for x in (query, key, value, g, beta)), schedule, use_qk_l2norm, scale
        )
    difference = _relative_difference(out.detach(), expected)
    check = VarlenCheck(query.dtype, difference, difference <= _tolerance(query.dtype))
    _CHECKS[(kernel, query.dtype)] = check
    if check.passed:
        logger.info("variable-length gated delta kernel agrees with the torch kernel (%.1e)", difference)
        return out
    logger.warning(
        "the variable-length gated delta kernel %s differs from the exact torch kernel by %.3g of the output's scale "
        "on this layout (over %.0e): its segment boundaries or states are not what this layout passed. Using the "
        "torch kernel for the rest of this process; set %s=0 to skip the check's kernel altogether.",
        getattr(kernel, "__module__", kernel),
        difference,
        _tolerance(query.dtype),
        FLA_SWITCH,
    )
    return ragged_gated_delta_rule(query, key, value, g, beta, schedule, use_qk_l2norm, scale)

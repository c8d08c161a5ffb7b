"""Running a gated-delta, Mamba2 or short-convolution mixer's own forward once over all packed tokens, unpadded.

The padded segmented run (`segmented.run_segmented`) calls a mixer on batches of segments, so every projection and
the scan compute padded slots, and sharing cuts documents into more, shorter segments than stock's rows. Here the
mixer's forward runs once on ``[1, N, hidden]``, all packed tokens end to end: its projections, gates and norms see
only real tokens, and the two calls in it that carry state along the sequence, the causal convolution helper and the
chunked scan (the gated delta rule, or Mamba2's selective scan), are replaced for this call only by ragged versions
(`ragged_kernels`) that keep every segment to itself and start each branch from its prefix's state (`ragged_plan`);
on CUDA with flash-linear-attention installed, the gated and Kimi delta rules go to its variable-length kernels
(`varlen`).

Which calls those are is read from the forward's code (`ragged_recipe`): the convolution helper is the function it
calls that reaches ``update_conv_state``; the scan is the called name ending in ``chunk_gated_delta_rule`` or
``mamba2_scan_forward`` (the helper that takes the Mamba2 mixer and reads its decay, skip and time-step parameters
from it). A fused kernel the forward may try first (``..._split_conv1d_scan_combined``, which returns None unless a
Hub kernel is loaded) is answered None, so the forward takes its own torch path. Every
other call in the forward (and in its own methods) must be one that acts on each token alone (a projection, a
reshape, a gate, a norm); anything else, or a call pattern at run time other than one convolution and one scan,
leaves the mixer on the padded run, which is exact for any served mixer. The replacement is a copy of the forward
with its own globals, so nothing outside this call changes, and gradient checkpointing's recomputation (which calls
the layer again) takes the same path.
"""

from __future__ import annotations

import ast
import functools
import inspect
import types
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from trl_prefix_share.core.code_reading import body_calls, called_name, function_facts, plain_function, self_attribute
from trl_prefix_share.core.mixers.kinds import class_verdict
from trl_prefix_share.core.mixers.ragged_kernels import (
    ragged_causal_conv,
    ragged_gated_delta_rule,
    ragged_mamba2_scan,
)
from trl_prefix_share.core.mixers.ragged_plan import DELTA_CHUNK, RaggedPlan
from trl_prefix_share.core.mixers.varlen import checked_varlen_gated_delta_rule, varlen_kernel_for

#: Mixer kinds whose state lives in a convolution helper and (gated and Kimi delta, Mamba2) one chunked scan.
RAGGED_KINDS = ("short_conv", "gated_delta", "kimi_delta", "mamba2")
#: Methods a ragged forward may call besides the two calls it hands over: each acts on every token alone, only
#: reshapes, or is a cache method (the ragged call passes no cache, so the forward skips those). A method named
#: otherwise keeps the mixer on the padded run. Reductions (``max``, ``sum``, ``mean``, ...) are not here: called on
#: a tensor they could pool over time, across documents.
TOKENWISE_METHODS = frozenset(
    {
        "get_recurrent_state",
        "get_recurrent_states_to_keep",
        "update_recurrent_state",
        "get_conv_state",
        "update_conv_state",
        "is_recording_past",
        "increase_count",
        "has_previous_state",
        "sigmoid",
        "softplus",
        "log",
        "where",  # elementwise selection (``torch.where(condition, a, b)``), as a gate's overflow guard uses it
        "silu",
        "exp",
        "float",
        "to",
        "reshape",
        "view",
        "transpose",
        "contiguous",
        "split",
        "tensor_split",
        "chunk",
        "cat",
        "unsqueeze",
        "squeeze",
        "size",
        "append",  # a Python list of outputs
        "pop",  # ``kwargs.pop``
        "get",
    }
)
#: Plain functions a ragged forward may call: Python's builtins on sizes, and the padding mask (none here).
TOKENWISE_FUNCTIONS = frozenset({"len", "min", "max", "range", "apply_mask_to_padding_states"})
#: Activations the ragged convolution applies (those transformers' and causal-conv1d's helpers accept).
_ACTIVATIONS = (None, "silu", "swish")
_SCAN_SUFFIX = "chunk_gated_delta_rule"
_STEP_SUFFIX = "recurrent_gated_delta_rule"
_KIMI_SCAN_SUFFIX = "chunk_kimi_delta_attention"
_KIMI_STEP_SUFFIX = "recurrent_kimi_delta_attention"
_MAMBA2_SCAN_SUFFIX = "mamba2_scan_forward"
#: The scan each kind's forward calls (by the end of its name).
_SCAN_OF_KIND = {"gated_delta": _SCAN_SUFFIX, "kimi_delta": _KIMI_SCAN_SUFFIX, "mamba2": _MAMBA2_SCAN_SUFFIX}
#: A fused convolution + scan + norm + projection kernel: its torch fallback returns None (the forward then runs
#: step by step); a loaded Hub kernel would scan the packed row without boundaries, so the ragged call answers None.
_FUSED_SUFFIX = "split_conv1d_scan_combined"
#: The Mamba2 mixer's attributes the scan helper reads (transformers' documented arguments of the helper).
_MAMBA2_FIELDS = ("A_log", "D", "dt_bias", "time_step_limit", "num_heads", "head_dim", "n_groups", "ssm_state_size")
#: transformers <= 5.24 convolves inline: the forward calls the convolution kernel itself (``causal_conv1d_fn(x,
#: weight [C, K], bias, activation)``) and, on a one-token decode, the in-place update (never reached here).
_CONV_KERNEL_SUFFIX = "causal_conv1d_fn"
_CONV_STEP_SUFFIX = "causal_conv1d_update"
#: How deep the forward's own methods (``self.helper(...)``) are followed.
_METHOD_DEPTH = 2


class RaggedUnsupported(Exception):
    """This mixer (or this call) cannot take the ragged run; the padded segmented run is used instead."""


@dataclass(frozen=True)
class RaggedRecipe:
    """What to replace in a mixer class's forward: the convolution's global name, the scan kernel's (None for a
    convolution-only mixer), kernels that must not be reached (the one-token steps), and the submodules the forward
    calls (each must act per token, checked on the instance). ``conv_takes_weights``: the convolution is the kernel
    itself (inputs, weight, bias), as transformers <= 5.24 calls it, rather than the helper that takes the module."""

    conv_helper: str
    scan_kernel: str | None
    refused: tuple[str, ...]
    submodules: tuple[str, ...]
    conv_takes_weights: bool = False
    fused: tuple[str, ...] = ()


def _read_calls(module_class: type, function: Any, found: dict, depth: int) -> None:
    """Sort every call of ``function`` into ``found``; raise RaggedUnsupported with the first disallowed one."""
    calls = body_calls(function)
    if calls is None:
        raise RaggedUnsupported(
            f"the source of {module_class.__name__}.{getattr(function, '__name__', '?')} is unreadable"
        )
    plain = plain_function(function)
    for call in calls:
        name = self_attribute(call)
        if name is not None:
            method = plain_function(inspect.getattr_static(module_class, name, None))
            if method is None:
                found["submodules"].add(name)
            elif depth < _METHOD_DEPTH:
                _read_calls(module_class, method, found, depth + 1)
            else:
                raise RaggedUnsupported(f"{module_class.__name__}.{name} nests too deep to read")
            continue
        if isinstance(call.func, ast.Attribute):
            if call.func.attr not in TOKENWISE_METHODS:
                raise RaggedUnsupported(f"{module_class.__name__} calls `{call.func.attr}`")
            continue
        global_name = called_name(call) if isinstance(call.func, ast.Name) else None
        if global_name is None:
            raise RaggedUnsupported(f"{module_class.__name__} makes a call the ragged run cannot read")
        target = plain.__globals__.get(global_name) if plain is not None else None
        if global_name.endswith(tuple(_SCAN_OF_KIND.values())):
            found["scan"].add(global_name)
        elif global_name.endswith(_FUSED_SUFFIX):
            found["fused"].add(global_name)
        elif global_name.endswith((_STEP_SUFFIX, _KIMI_STEP_SUFFIX, _CONV_STEP_SUFFIX)):
            found["refused"].add(global_name)
        elif global_name.endswith(_CONV_KERNEL_SUFFIX):
            found["conv_kernel"].add(global_name)
        elif target is not None and function_facts(target).calls_any("update_conv_state"):
            found["conv"].add(global_name)
        elif global_name not in TOKENWISE_FUNCTIONS:
            raise RaggedUnsupported(f"{module_class.__name__} calls `{global_name}`")


@functools.cache
def ragged_recipe(module_class: type) -> RaggedRecipe | str:
    """The recipe for a mixer class, or the reason it stays on the padded run."""
    verdict = class_verdict(module_class)
    if verdict is None or verdict.kind not in RAGGED_KINDS:
        return f"{module_class.__name__}: the ragged run serves {', '.join(RAGGED_KINDS)} mixers only"
    found: dict[str, set] = {
        "conv": set(),
        "conv_kernel": set(),
        "scan": set(),
        "refused": set(),
        "submodules": set(),
        "fused": set(),
    }
    try:
        _read_calls(module_class, module_class.forward, found, 0)
    except RaggedUnsupported as reason:
        return str(reason)
    convolutions = found["conv"] | found["conv_kernel"]
    if len(convolutions) != 1:
        return f"{module_class.__name__}: expected one convolution call, found {sorted(convolutions)}"
    wants_scan = verdict.kind in _SCAN_OF_KIND
    if len(found["scan"]) != int(wants_scan):
        return f"{module_class.__name__}: expected {int(wants_scan)} chunked scan(s), found {sorted(found['scan'])}"
    scan = next(iter(found["scan"]), None)
    if scan is not None and not scan.endswith(_SCAN_OF_KIND[verdict.kind]):
        return f"{module_class.__name__}: a {verdict.kind} mixer calls the scan `{scan}`"
    return RaggedRecipe(
        next(iter(convolutions)),
        scan,
        tuple(sorted(found["refused"])),
        tuple(sorted(found["submodules"])),
        conv_takes_weights=bool(found["conv_kernel"]),
        fused=tuple(sorted(found["fused"])),
    )


#: torch's normalisations whose statistics run over the batch or the sequence (not one token's features).
_POOLING_NORMS = (
    torch.nn.modules.batchnorm._NormBase,  # batch and instance norms
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
)


def _acts_per_token(module: torch.nn.Module) -> bool:
    """A projection (LoRA-wrapped too), dropout, identity or normalisation over features: no mixing along time."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(base, torch.nn.Linear | torch.nn.Dropout | torch.nn.Identity | torch.nn.LayerNorm | torch.nn.RMSNorm):
        return True
    if any(isinstance(m, (*_POOLING_NORMS, torch.nn.Conv1d)) for m in base.modules()):
        return False
    if "Norm" in type(base).__name__:  # a model's own RMSNorm / gated RMSNorm over the features
        return True
    return _forward_is_tokenwise(base)


@functools.cache
def _tokenwise_reading(module_class: type) -> tuple[str, ...] | None:
    """Read once per class: the ``self.<name>(...)`` calls of its forward when every other call in it is per token
    (`TOKENWISE_METHODS`, `TOKENWISE_FUNCTIONS`); None otherwise or when unreadable."""
    calls = body_calls(module_class.forward)
    if calls is None:
        return None
    submodules = []
    for call in calls:
        name = self_attribute(call)
        if name is not None:
            submodules.append(name)
        elif isinstance(call.func, ast.Attribute):
            if call.func.attr not in TOKENWISE_METHODS:
                return None
        elif called_name(call) not in TOKENWISE_FUNCTIONS:
            return None
    return tuple(dict.fromkeys(submodules))


def _forward_is_tokenwise(module: torch.nn.Module) -> bool:
    """A module of the model's own (a gate) whose forward makes only per-token calls: `TOKENWISE_METHODS`,
    `TOKENWISE_FUNCTIONS` and submodules that act per token themselves (followed down the module tree). Its source
    is read once per class: this runs on every mixer call of a packed forward."""
    submodules = _tokenwise_reading(type(module))
    if submodules is None:
        return False
    return all(
        isinstance(sub := getattr(module, name, None), torch.nn.Module) and _acts_per_token(sub) for name in submodules
    )


def instance_recipe(module: torch.nn.Module, original_forward: Any) -> RaggedRecipe | str:
    """The class's recipe if this instance can take it: its forward is still the class's (no hook wrapped it), no
    accelerate hook moves its weights, and every submodule the forward calls acts per token."""
    recipe = ragged_recipe(type(module))
    if isinstance(recipe, str):
        return recipe
    if getattr(original_forward, "__func__", None) is not type(module).forward:
        return f"{type(module).__name__}: its forward was wrapped after loading"
    if any(hasattr(sub, "_hf_hook") for sub in module.modules()):
        return f"{type(module).__name__}: accelerate hooks place its weights"
    for name in recipe.submodules:
        sub = getattr(module, name, None)
        if not isinstance(sub, torch.nn.Module) or not _acts_per_token(sub):
            return f"{type(module).__name__}.{name} is not a per-token layer"
    return recipe


def _depthwise(conv: torch.nn.Module) -> torch.nn.Conv1d:
    if not (
        isinstance(conv, torch.nn.Conv1d)
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.stride == (1,)
        and conv.dilation == (1,)
    ):
        raise RaggedUnsupported(f"{type(conv).__name__} is not a depthwise causal convolution")
    return conv


def run_ragged(module: torch.nn.Module, hidden_states: torch.Tensor, plan: RaggedPlan, recipe: RaggedRecipe, **kwargs):
    """The mixer's output for every packed position from one call of its forward over all packed tokens."""
    calls: Counter = Counter()
    is_kimi = recipe.scan_kernel is not None and recipe.scan_kernel.endswith(_KIMI_SCAN_SUFFIX)

    def conv_helper(conv, inputs, *_args, activation=None, **_kwargs):
        calls["conv"] += 1
        conv = _depthwise(conv)
        if activation not in _ACTIVATIONS:
            raise RaggedUnsupported(f"convolution activation {activation!r}")
        gather = plan.conv_gather(conv.kernel_size[0], inputs.device)
        return ragged_causal_conv(inputs, conv.weight, conv.bias, activation, gather)

    def conv_kernel(inputs, weight, bias=None, activation=None, **_kwargs):
        calls["conv"] += 1
        if activation not in _ACTIVATIONS or weight.dim() != 2 or weight.size(0) != inputs.size(1):
            raise RaggedUnsupported("the convolution kernel was called with another weight layout or activation")
        gather = plan.conv_gather(weight.size(-1), inputs.device)
        return ragged_causal_conv(inputs, weight.unsqueeze(1), bias, activation, gather)

    def scan_kernel(
        query,
        key,
        value,
        g,
        beta,
        chunk_size=DELTA_CHUNK,
        initial_state=None,
        scale=None,
        use_qk_l2norm_in_kernel=False,
        cu_seqlens=None,
        **extra,
    ):
        calls["scan"] += 1
        if initial_state is not None or cu_seqlens is not None or extra.get("seq_idx") is not None:
            raise RaggedUnsupported("the scan was handed a state or sequence boundaries of its own")
        if is_kimi and scale is not None:  # its torch path takes no scale: the kernel's d_k ** -0.5
            raise RaggedUnsupported("the Kimi delta scan was handed a scale")
        kernel = varlen_kernel_for(query.device, "kimi_delta" if is_kimi else "gated_delta")
        if kernel is not None:
            scanned = checked_varlen_gated_delta_rule(
                kernel, plan, query, key, value, g, beta, use_qk_l2norm_in_kernel, scale, chunk_size
            )
            return scanned, None
        schedule = plan.chunk_schedule(query.device, chunk_size)
        return ragged_gated_delta_rule(query, key, value, g, beta, schedule, use_qk_l2norm_in_kernel, scale), None

    def mamba2_scan(mixer, hidden, B, C, dt, cache=None, **extra):
        calls["scan"] += 1
        if mixer is not module or cache is not None or any(extra.get(k) is not None for k in ("seq_idx", "cu_seqlens")):
            raise RaggedUnsupported("the scan was handed another mixer, a cache or sequence boundaries of its own")
        missing = [name for name in _MAMBA2_FIELDS if not hasattr(module, name)]
        if missing:
            raise RaggedUnsupported(f"the Mamba2 mixer lacks {missing}")
        tokens, heads, head_dim = hidden.size(1), module.num_heads, module.head_dim
        groups, state = module.n_groups, module.ssm_state_size
        scanned = ragged_mamba2_scan(
            hidden.reshape(1, tokens, heads, head_dim),
            dt,
            -torch.exp(module.A_log.float()),
            B.reshape(1, tokens, groups, state),
            C.reshape(1, tokens, groups, state),
            module.D,
            module.dt_bias,
            tuple(module.time_step_limit),
            plan.chunk_schedule(hidden.device, DELTA_CHUNK),
        )
        return scanned.reshape(1, tokens, heads * head_dim)

    def fused(*_args, **_kwargs):
        return None  # as the kernel's torch fallback: the forward then runs its convolution and scan

    def refused(*_args, **_kwargs):
        raise RaggedUnsupported("the forward took its one-token step")

    forward = plain_function(type(module).forward)
    namespace = dict(forward.__globals__)
    namespace[recipe.conv_helper] = conv_kernel if recipe.conv_takes_weights else conv_helper
    if recipe.scan_kernel is not None:
        is_mamba2 = recipe.scan_kernel.endswith(_MAMBA2_SCAN_SUFFIX)
        namespace[recipe.scan_kernel] = mamba2_scan if is_mamba2 else scan_kernel
    for name in recipe.fused:
        namespace[name] = fused
    for name in recipe.refused:
        namespace[name] = refused
    patched = types.FunctionType(
        forward.__code__, namespace, forward.__name__, forward.__defaults__, forward.__closure__
    )
    patched.__kwdefaults__ = forward.__kwdefaults__
    out = patched(module, hidden_states.reshape(1, -1, hidden_states.size(-1)), **kwargs)
    expected = Counter({"conv": 1, "scan": int(recipe.scan_kernel is not None)})
    if not isinstance(out, torch.Tensor) or +calls != +expected:
        raise RaggedUnsupported(f"the forward made {dict(calls)} state-carrying calls, not {dict(+expected)}")
    return out.view(*hidden_states.shape[:-1], out.size(-1))

"""What a state-carrying token mixer is, read from its code, and whether the segmented run serves it exactly.

A mixer is served when it is one of the kinds below, all of which the equivalence tests cover: its forward takes
transformers' ``cache``, writes its convolution inputs through ``update_conv_state`` (so a branch's convolution sees
its prefix's last inputs) and, if it has a recurrent state, starts its scan from ``get_recurrent_state`` and hands the
final state to ``update_recurrent_state``. Anything else that carries a state (a Mamba1 scan, a mixer whose scan
ignores a cached state, a recurrence without the cache interface) is refused with its reason, and the trainer falls
back to the exact stock path. The check reads source code only, so it holds under every launcher: the forward and
the helpers it calls (`core.code_reading`), since transformers moves these calls into shared helpers between releases.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from trl_prefix_share.core.code_reading import CodeFacts, forward_facts, function_source

#: Kinds whose kernels compute in a fixed precision whatever the model's dtype: transformers' gated delta rule and
#: Mamba2 scan (and the fla / mamba-ssm kernels they can dispatch to) run in float32, so a float64 model carries
#: float32 rounding there, and another chunking of the same sequence (prefix, then branch) rounds differently.
KIND_COMPUTE_DTYPE = {"gated_delta": torch.float32, "mamba2": torch.float32, "kimi_delta": torch.float32}
#: Served kinds with a recurrent state, by the kernel their forward calls (a conv-only mixer is ``short_conv``); a
#: called name ending in one of these counts (``torch_chunk_gated_delta_rule`` is transformers' torch path of it).
_KERNEL_CALLS = {
    "mamba2": "mamba2_chunk_scan",
    "gated_delta": "chunk_gated_delta_rule",
    "kimi_delta": "chunk_kimi_delta_attention",
}
_INITIAL_STATE_KEYWORDS = ("initial_state", "initial_states")


@dataclass(frozen=True)
class MixerVerdict:
    """``kind`` when served; otherwise ``reason`` says what stops it."""

    name: str
    kind: str | None = None
    reason: str | None = None

    @property
    def served(self) -> bool:
        return self.kind is not None

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The precision the mixer's kernel computes in regardless of the model's dtype (None: the model's)."""
        return KIND_COMPUTE_DTYPE.get(self.kind)


def forward_source(module_class: type) -> str:
    """A layer class's own forward source (decorators unwrapped); "" if unreadable."""
    return function_source(getattr(module_class, "forward", None))


@functools.cache
def _takes_cache(module_class: type) -> bool:
    try:
        parameters = inspect.signature(module_class.forward).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in parameters


def _starts_from_cached_state(facts: CodeFacts) -> bool:
    """Some call hands a state in as ``initial_state(s)=`` (not the constant None)."""
    return any(key in _INITIAL_STATE_KEYWORDS and value != "None" for key, value in facts.keywords)


def _kernel_kind(facts: CodeFacts) -> str | None:
    for kind, kernel in _KERNEL_CALLS.items():
        if any(count and name.endswith(kernel) for name, count in facts.calls.items()):
            return kind
    return None


@functools.cache
def _classify(module_class: type) -> MixerVerdict | None:
    facts = forward_facts(module_class)
    name = module_class.__name__
    reads_conv = facts.calls_any("update_conv_state")
    reads_recurrent = facts.calls_any("get_recurrent_state")
    writes_recurrent = facts.calls_any("update_recurrent_state")
    if not (reads_conv or reads_recurrent):
        return None  # not a mixer that keeps its state in transformers' cache
    if not _takes_cache(module_class):
        return MixerVerdict(name, reason=f"{name} keeps a state but its forward takes no `cache`")
    if not reads_recurrent:
        if writes_recurrent:
            return MixerVerdict(name, reason=f"{name} writes a recurrent state it never reads back")
        return MixerVerdict(name, kind="short_conv")
    if not _starts_from_cached_state(facts):
        return MixerVerdict(name, reason=f"{name} does not start its multi-token scan from a cached state")
    kind = _kernel_kind(facts)
    if kind is None:
        return MixerVerdict(name, reason=f"{name} runs a recurrence the packed path does not serve yet")
    if not reads_conv or not writes_recurrent:
        return MixerVerdict(name, reason=f"{name} does not pass its states through the cache interface")
    return MixerVerdict(name, kind=kind)


def class_verdict(module_class: type) -> MixerVerdict | None:
    """The verdict on a layer class (None: it keeps no state in transformers' cache)."""
    return _classify(module_class)


def mixer_verdict(module: torch.nn.Module) -> MixerVerdict | None:
    """The verdict on a module that keeps a per-sequence state in transformers' cache; None for any other module."""
    return _classify(type(module))


def compute_precision(model: torch.nn.Module) -> torch.dtype:
    """The coarsest precision the packed forward computes in: the model's, or a served mixer's fixed one."""
    dtypes = [next(model.parameters()).dtype]
    for module in model.modules():
        verdict = mixer_verdict(module)
        if verdict is not None and verdict.compute_dtype is not None:
            dtypes.append(verdict.compute_dtype)
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)


def left_padding_keeps_zero_state(module: torch.nn.Module, verdict: MixerVerdict) -> bool:
    """Whether zeroed inputs in front of a sequence leave the mixer's state exactly zero, so prefixes of different
    lengths can share one left-padded call (given the padding mask, as stock's left-padded batches are).

    True when no projection or convolution of the mixer adds a bias: a zero input then gives zero convolution inputs,
    keys, values (gated and Kimi delta rules) and zero scan inputs (Mamba2), and a zero state only decays. A Mamba2
    mixer with a convolution bias qualifies too when it masks the padding again after its convolution, as
    transformers' do. Otherwise the prefixes run grouped by length, unpadded."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv1d)]
    if all(getattr(layer, "bias", None) is None for layer in layers):
        return True
    masks_after_conv = forward_facts(type(module)).calls["apply_mask_to_padding_states"] >= 2
    linear_biases = [m.bias for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return verdict.kind == "mamba2" and masks_after_conv and all(bias is None for bias in linear_biases)

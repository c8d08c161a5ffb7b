"""The structural mixer check reads what a forward does through the helpers it calls, so refactors of transformers'
modeling code (a call moved into a shared helper, a decorator added, a helper wrapped by the `kernels` package into a
module object) keep a mixer classified right; a helper that does something else still falls back.

The planted mixers below are small modules of this file; `_classify` never runs them (it reads their code), and the
real transformers mixers of the installed release are classified in `test_hybrid_mixers.py`.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers.integrations import use_kernel_forward_from_hub

from trl_prefix_share.core.code_reading import calls_passing_kwargs, forward_facts, function_source, plain_function
from trl_prefix_share.core.mixers.kinds import _classify


def logged(function):
    """A decorator like transformers' own (`deprecate_kwarg`, `force_accelerate_hooks`): `functools.wraps`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)

    return wrapper


def torch_chunk_gated_delta_rule(query, initial_state=None, output_final_state=False):
    """A stand-in kernel (its name is what the check reads); never called here."""
    return query, initial_state


def mamba_selective_scan(hidden_states):
    """A scan that takes no initial state (transformers' Mamba1 torch path)."""
    return hidden_states


def convolve_with_cache(conv, hidden_states, cache, layer_idx):
    """The convolution inputs go through the cache, as transformers' `causal_conv1d_forward` does."""
    if cache is not None:
        hidden_states = cache.update_conv_state(hidden_states, layer_idx, conv_kernel_size=conv.kernel_size[0])
    return conv(hidden_states)


@use_kernel_forward_from_hub("planted_scan_forward")
def scan_with_cache(module, hidden_states, cache):
    """The recurrence starts from and hands back the cached state; wrapped by `kernels` where it is installed."""
    state = cache.get_recurrent_state(module.layer_idx) if cache is not None else None
    out, final = torch_chunk_gated_delta_rule(hidden_states, initial_state=state, output_final_state=True)
    if cache is not None:
        cache.update_recurrent_state(final, module.layer_idx)
    return out


def scan_from_zero(module, hidden_states, cache):
    """Reads the cached state but never starts the scan from it (the helper does something else)."""
    cache.get_recurrent_state(module.layer_idx)
    out = mamba_selective_scan(hidden_states)
    cache.update_recurrent_state(out, module.layer_idx)
    return out


class DelegatingMixer(torch.nn.Module):
    """A gated-delta mixer whose forward delegates its convolution and its state updates to helpers, decorated."""

    layer_idx = 0

    @logged
    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        hidden_states = convolve_with_cache(self.conv, hidden_states, cache, self.layer_idx)
        return self.run_scan(hidden_states, cache)

    def run_scan(self, hidden_states, cache):
        return scan_with_cache(self, hidden_states, cache)


class DelegatingShortConv(torch.nn.Module):
    """A short convolution whose cache update sits in a helper two calls deep."""

    layer_idx = 0

    @logged
    @logged
    def forward(self, hidden_states, cache=None, **kwargs):
        return self.inner(hidden_states, cache)

    def inner(self, hidden_states, cache):
        return convolve_with_cache(self.conv, hidden_states, cache, self.layer_idx)


class ZeroStartMixer(torch.nn.Module):
    """Delegates like `DelegatingMixer`, but its helper runs the scan from zero."""

    layer_idx = 0

    def forward(self, hidden_states, cache=None, **kwargs):
        hidden_states = convolve_with_cache(self.conv, hidden_states, cache, self.layer_idx)
        return scan_from_zero(self, hidden_states, cache)


class MentionsOnly(torch.nn.Module):
    """Names the cache calls in a docstring and a comment only: ``cache.update_conv_state(x)``."""

    def forward(self, hidden_states, cache=None):
        # cache.get_recurrent_state(0) would be read here by a text search
        return hidden_states


def test_a_refactored_mixer_is_still_served():
    """Calls moved into helpers (module functions, a method, a `kernels` wrapper module) under stacked decorators."""
    assert _classify(DelegatingMixer).kind == "gated_delta"
    assert _classify(DelegatingShortConv).kind == "short_conv"
    facts = forward_facts(DelegatingMixer)
    assert {"convolve_with_cache", "DelegatingMixer.run_scan", "scan_with_cache"} <= set(facts.functions)
    assert facts.passes("initial_state", "state")


def test_the_forward_alone_would_not_serve_it():
    """The same mixer read one function deep (what the old text check saw) is not recognised: the helpers matter."""
    assert not forward_facts(DelegatingMixer, depth=0).calls_any("update_conv_state", "get_recurrent_state")


def test_a_helper_that_does_something_else_falls_back():
    verdict = _classify(ZeroStartMixer)
    assert not verdict.served and "does not start its multi-token scan from a cached state" in verdict.reason


def test_comments_and_docstrings_do_not_count():
    assert _classify(MentionsOnly) is None


def test_kernels_wrapper_modules_are_read_through():
    """`use_kernel_forward_from_hub` on a function gives a module object with `kernels` installed (the function itself
    without it); either way its source is the function's."""
    assert plain_function(scan_with_cache).__name__ == "scan_with_cache"
    assert "get_recurrent_state" in function_source(scan_with_cache)


def test_keywords_passed_on_are_read_from_the_call():
    class Parent(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            hidden_states = self.norm(hidden_states)  # `self.mixer(` in a comment does not count, **kwargs
            return self.mixer(hidden_states=hidden_states, **kwargs)

    class Dropping(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return self.mixer(hidden_states, mask=kwargs.get("mask"))

    assert calls_passing_kwargs(Parent, "mixer")
    assert not calls_passing_kwargs(Parent, "norm")
    assert not calls_passing_kwargs(Dropping, "mixer")


# -- segmented mixers stay installed and bound to their own module -----------------------------------------------------


@pytest.fixture
def switched_lfm2(tokenizer):
    from test_hybrid_mixers import FAMILIES, SMALL
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from trl_prefix_share.core.model_support import enable_prefix_sharing

    config = AutoConfig.for_model("lfm2", vocab_size=len(tokenizer), **SMALL, **FAMILIES["lfm2"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    add_fused_lm_head(model)
    enable_prefix_sharing(model, "sdpa")
    return model


def mixers_of(model):
    return [module for module in model.modules() if type(module).__name__ == "Lfm2ShortConv"]


def test_a_copied_model_runs_its_own_mixers(switched_lfm2):
    """A reference model deep-copied from a switched policy: each copied mixer's segmented forward and the forward it
    wraps are bound to the copy, so the copy computes with its own weights (a closure would run the original's)."""
    from trl_prefix_share.core.mixers.segmented import _ORIGINAL

    copied = copy.deepcopy(switched_lfm2)
    for mixer in mixers_of(copied):
        assert mixer.forward.__self__ is mixer
        assert getattr(mixer, _ORIGINAL).__self__ is mixer


def test_a_dropped_segmented_forward_is_put_back(switched_lfm2):
    """What `kernels`' re-kernelization on `train()` / `eval()` does to an instance forward (it pops it): the next
    packed forward installs the segmented forward again; a mixer that never ran on the layout is refused."""
    from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout
    from trl_prefix_share.core.mixers.segmented import check_mixers_ran, restore_segmented_mixers

    (mixer,) = mixers_of(switched_lfm2)
    mixer.__dict__.pop("forward")
    assert restore_segmented_mixers(switched_lfm2) == 1
    assert mixer.forward.__self__ is mixer and mixer.forward.__func__.__name__ == "_segmented_forward"
    layout = PackedAttentionLayout(
        {name: torch.zeros(1, 2) for name in ("document_ids", "branch_ids", "span_ends", "position_ids")}, "sdpa"
    )
    with pytest.raises(RuntimeError, match="only 0 of its 1 state-carrying mixers ran on the packed layout"):
        check_mixers_ran(switched_lfm2, layout, 1)


def test_a_mixer_replaced_by_a_hub_kernel_is_refused(switched_lfm2):
    from trl_prefix_share.core.mixers.segmented import restore_segmented_mixers

    (mixer,) = mixers_of(switched_lfm2)
    mixer.__dict__.pop("forward")
    mixer.__dict__["_kernel_repo"] = "kernels-community/some-conv"
    with pytest.raises(RuntimeError, match="Hub kernel"):
        restore_segmented_mixers(switched_lfm2)

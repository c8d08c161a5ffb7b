"""Running a state-carrying mixer's own forward over the segments of a packed layout.

Installed per mixer module when a model is switched. Outside a packed forward the mixer runs untouched (padded
batches, ``generate`` with its cache). During one, a convolution or gated-delta mixer whose forward `ragged` can
read runs once over the packed tokens (no padding). Any other served mixer (and one whose ragged call is refused at
run time) takes the padded run: it is called for the shared prefixes from a zero state
(left-padded length buckets where zeroed padding keeps that state zero, else one call per prefix length), then for
the branches in length buckets, each branch given the final state of its own prefix through a `StateCarrier`; the
outputs are put back in their packed places. The segments are built once per step and cached on the layout, so
every mixer layer and the reference forward share them.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

from trl_prefix_share.core.attention import is_packed_forward_active
from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout
from trl_prefix_share.core.mixers.kinds import left_padding_keeps_zero_state, mixer_verdict
from trl_prefix_share.core.mixers.ragged import RaggedUnsupported, instance_recipe, run_ragged
from trl_prefix_share.core.mixers.ragged_plan import build_ragged_plan
from trl_prefix_share.core.mixers.segments import MixerSegments, SegmentBatch, build_segments
from trl_prefix_share.core.mixers.state_carrier import StateCarrier

logger = logging.getLogger(__name__)

_MARK = "_prefix_share_segmented"
LAYOUT_KEYWORD = "prefix_share_layout"


def segments_of(layout: PackedAttentionLayout, device: torch.device, left_padded: bool) -> MixerSegments:
    """The layout's mixer segments, built on the first mixer call of a step that needs them."""
    return layout.cached(
        ("mixer_segments", str(device), left_padded),
        lambda: build_segments(layout.document_ids, layout.branch_ids, layout.span_ends, left_padded).to(device),
    )


def _call(mixer_forward, flat: torch.Tensor, batch: SegmentBatch, carrier: StateCarrier, left_padded: bool, **kwargs):
    """One mixer call over ``batch``; returns the real slots' outputs and their flat packed places."""
    inputs = flat[batch.index]
    mask = None
    if left_padded and batch.valid is not None:  # zeroed padding plus the padding mask, as stock's left padding
        inputs = inputs * batch.valid[..., None].to(inputs.dtype)
        mask = batch.valid.long()
    out = mixer_forward(inputs, cache=carrier, attention_mask=mask, **kwargs)
    out, places = out.reshape(-1, out.size(-1)), batch.index.reshape(-1)
    if batch.valid is None:
        return out, places
    valid = batch.valid.reshape(-1)
    return out[valid], places[valid]


def _prefix_states(carrier: StateCarrier, batch: SegmentBatch, left_padded: bool) -> dict:
    """The final states of a prefix call; a left-padded call's convolution columns left of a short prefix are
    padding, set to zero (a zero initial state)."""
    states = carrier.final_states()
    if left_padded and batch.valid is not None:
        for key, state in list(states.items()):
            if key[0] == "conv":
                width = state.size(-1)
                real = torch.nn.functional.pad(batch.valid, (width, 0))[:, -width:]
                states[key] = state * real[:, None, :].to(state.dtype)
    return states


def _state_table(per_call: list[tuple[SegmentBatch, dict]], num_prefixes: int) -> dict:
    """Each state of every prefix by prefix id + 1, with a zero state in row 0 (out of place: autograd follows)."""
    tables: dict = {}
    for batch, states in per_call:
        for key, state in states.items():
            if key not in tables:
                tables[key] = state.new_zeros((num_prefixes + 1, *state.shape[1:]))
            tables[key] = tables[key].index_copy(0, batch.members + 1, state)
    if per_call and any(states.keys() != tables.keys() for _, states in per_call):
        raise RuntimeError("A mixer wrote different states for different prefix calls.")
    return tables


def run_segmented(mixer_forward, hidden_states: torch.Tensor, segments: MixerSegments, **kwargs: Any) -> torch.Tensor:
    """The mixer's output for every packed position, each run seeing exactly its own sequence's past."""
    flat = hidden_states.reshape(-1, hidden_states.size(-1))
    outputs, places, per_call = [], [], []
    for batch in segments.prefix_calls:
        carrier = StateCarrier()
        out, place = _call(mixer_forward, flat, batch, carrier, segments.left_padded, **kwargs)
        outputs.append(out)
        places.append(place)
        per_call.append((batch, _prefix_states(carrier, batch, segments.left_padded)))
    tables = _state_table(per_call, segments.num_prefixes)
    for batch in segments.branch_buckets:
        parents = segments.branch_parent[batch.members]
        initial = {key: table[parents] for key, table in tables.items()}
        carrier = StateCarrier(
            {index: state for (kind, index), state in initial.items() if kind == "conv"},
            {index: state for (kind, index), state in initial.items() if kind == "recurrent"},
        )
        out, place = _call(mixer_forward, flat, batch, carrier, False, **kwargs)
        outputs.append(out)
        places.append(place)
    width = outputs[0].size(-1)
    result = outputs[0].new_zeros(segments.num_tokens, width)
    result = result.index_copy(0, torch.cat(places), torch.cat(outputs))
    return result.view(*hidden_states.shape[:-1], width)


_ORIGINAL = "_prefix_share_unsegmented_forward"


def _segmented_forward(module: torch.nn.Module, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
    """The mixer's forward during a packed forward (its own forward otherwise). Bound to the module as a method, with
    the replaced forward kept as a bound method on it too, so that `copy.deepcopy` (a reference model copied from a
    switched policy, the probe's copy) rebinds both to the copy: a closure over the module would keep running the
    original module's weights inside the copy."""
    original = getattr(module, _ORIGINAL)
    layout = kwargs.pop(LAYOUT_KEYWORD, None)
    if hidden_states is None:
        hidden_states = kwargs.pop("hidden_states")
    if layout is None:
        if is_packed_forward_active():
            raise RuntimeError(
                f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) was called without the "
                "packed layout, so its state would leak across documents and branches."
            )
        return original(hidden_states, *args, **kwargs)
    if args or kwargs.get("cache") is not None or kwargs.get("cache_params") is not None:
        raise RuntimeError(f"{type(module).__name__}: a packed forward takes no cache and no positional inputs.")
    for name in ("cache", "cache_params", "attention_mask"):
        kwargs.pop(name, None)  # the layout replaces the padding mask; MoE token weights are not a mask
    layout.mixer_calls += 1
    recipe = instance_recipe(module, original) if type(module) not in _PADDED else _PADDED[type(module)]
    if not isinstance(recipe, str):
        plan = layout.cached(
            "ragged_plan", lambda: build_ragged_plan(layout.document_ids, layout.branch_ids, layout.span_ends)
        )
        try:
            return run_ragged(module, hidden_states, plan, recipe, **kwargs)
        except RaggedUnsupported as reason:
            recipe = f"{type(module).__name__}: {reason}"
            _PADDED[type(module)] = recipe
    _note_padded(type(module), recipe)
    left_padded = left_padding_keeps_zero_state(module, mixer_verdict(module))
    return run_segmented(original, hidden_states, segments_of(layout, hidden_states.device, left_padded), **kwargs)


def unsegmented_forward(module: torch.nn.Module):
    """The mixer's own forward that `install_segmented_mixers` replaced, or None for a module it did not wrap."""
    return module.__dict__.get(_ORIGINAL)


#: Mixer classes a ragged call was refused for at run time, with the reason (they take the padded run from then on).
_PADDED: dict[type, str] = {}
_NOTED: set[str] = set()


def _note_padded(module_class: type, reason: str) -> None:
    """Say once per reason why a mixer takes the padded run (exact, but computing padded slots)."""
    if reason not in _NOTED:
        _NOTED.add(reason)
        logger.info("Prefix sharing runs %s on padded segments: %s", module_class.__name__, reason)


setattr(_segmented_forward, _MARK, True)


def install_segmented_mixers(model: torch.nn.Module) -> int:
    """Wrap the forward of every served state-carrying mixer of ``model`` (idempotent); returns how many."""
    count = 0
    for module in model.modules():
        verdict = mixer_verdict(module)
        if verdict is None or not verdict.served:
            continue
        if not getattr(module.forward, _MARK, False):
            _refuse_hub_kernel(module)
            setattr(module, _ORIGINAL, module.forward)
            module.forward = types.MethodType(_segmented_forward, module)
        count += 1
    return count


def restore_segmented_mixers(model: torch.nn.Module) -> int:
    """Put back the segmented forward of every mixer `install_segmented_mixers` wrapped; returns how many there are.

    Every packed forward calls it (cheap: a walk over the modules): with the ``kernels`` package (a dependency of
    transformers >= 5.25, enabled by ``from_pretrained`` by default), ``PreTrainedModel.train()`` / ``eval()``
    re-kernelize the layers decorated for it, which pops a forward set on the instance. A mixer whose forward
    `kernelize` replaced by a Hub kernel is refused: such a kernel may keep its states itself, outside the cache
    interface the segmented run hands states through."""
    count = 0
    for module in model.modules():
        if _ORIGINAL not in module.__dict__:
            continue
        if not getattr(module.forward, _MARK, False):
            _refuse_hub_kernel(module)
            module.forward = types.MethodType(_segmented_forward, module)
        count += 1
    return count


def _refuse_hub_kernel(module: torch.nn.Module) -> None:
    if module.__dict__.get("_kernel_repo") is not None:
        raise RuntimeError(
            f"{type(module).__name__} runs a Hub kernel installed by `kernelize` ({module._kernel_repo}); prefix "
            "sharing serves this mixer only with transformers' own forward. Load the model with `use_kernels=False`, "
            "or leave this layer out of the kernel mapping."
        )


def check_mixers_ran(model: torch.nn.Module, layout: PackedAttentionLayout, served: int) -> None:
    """After a packed forward: every served mixer ran segmented. Fewer calls mean some mixer ran its plain forward
    over the packed rows (its state leaking across documents and branches): refuse the result."""
    if layout.mixer_calls < served:
        raise RuntimeError(
            f"{type(model).__name__}: only {layout.mixer_calls} of its {served} state-carrying mixers ran on the "
            "packed layout; the others would carry their state across documents and branches. Something replaced "
            "their forward after prefix sharing was installed."
        )

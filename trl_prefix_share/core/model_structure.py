"""What a model's layers are, read from its config and modules: which token mixers the packed path serves exactly.

This is the structural check behind the exact fallback. It never runs the model, so it holds under every launcher
(DeepSpeed ZeRO-3 and FSDP included, where the probe is skipped) and with ``verify_model=False``. A packed row is
exact only if every layer that mixes positions is attention that reads the packed layout: a convolution, an SSM /
Mamba mixer or a linear / gated-delta attention carries a state along the row (it would leak across documents and
from one branch into the next), and chunked or bidirectional attention follow rules the packed kernels do not
implement. Attention sinks and logit soft-capping are served when the layer hands them to the attention function
(`s_aux`, `softcap`). Sliding windows are served, but only when each layer's window is known:
the window of a layer is read from the config the way transformers builds its masks (``layer_types``, or one
``sliding_window`` for every layer), checked against the layer's own ``sliding_window`` attribute, and stamped on the
attention module so the kernel never depends on a keyword the model may not pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers.pytorch_utils import Conv1D as TransformersConv1D

from trl_prefix_share.core.attention.windows import WINDOW_ATTRIBUTE, positive_window
from trl_prefix_share.core.code_reading import calls_attribute, calls_passing_kwargs, forward_facts
from trl_prefix_share.core.mixers.kinds import forward_source, mixer_verdict

#: `layer_types` entries the packed path serves: attention (full or sliding) and layers that mix no positions.
SERVED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "mlp", "moe", "dense"})
#: `layer_types` entries of state-carrying mixers: served only where that layer holds a served mixer (`mixers.kinds`).
MIXER_LAYER_TYPES = frozenset({"conv", "linear_attention", "mamba", "hybrid"})

#: Words (of a module class name split at its CamelCase humps, joined by "_") that name a token mixer carrying a
#: state along the sequence: Mamba / SSM mixers, convolutions, linear and gated-delta attention, recurrences.
STATEFUL_MIXER_PATTERN = re.compile(
    r"(^|_)(mamba\d*|ssm|conv\d*|short_conv|gated_delta|delta_net|delta_attention|linear_attention|"
    r"lightning_attention|recurrent|rwkv\d*|retention|hyena|x_?lstm|m_lstm|s_lstm|griffin|rg_lru)(_|$)"
)
#: Class-name endings of modules that mix no positions even when their name says Mamba (``Mamba2RMSNorm``).
NOT_A_MIXER_PATTERN = re.compile(r"(^|_)(norm|rms_norm|layer_norm|group_norm|embedding|embeddings|mlp|experts)$")
_CAMEL_WORD = re.compile(r"[A-Z]+(?![a-z])\d*|[A-Z]?[a-z]+\d*|\d+")


def class_words(name: str) -> str:
    """``"NemotronHMamba2Mixer"`` -> ``"nemotron_h_mamba2_mixer"``: a class name as words a pattern can anchor on."""
    return "_".join(word.lower() for word in _CAMEL_WORD.findall(name))


#: Config attributes that switch on attention rules the packed kernels do not implement (value: reason).
UNSERVED_CONFIG_FLAGS = {
    "attention_chunk_size": "uses chunked attention (`attention_chunk_size`)",
    "use_bidirectional_attention": "attends bidirectionally (`use_bidirectional_attention`)",
    "alibi": "adds ALiBi position biases inside attention (`alibi`)",
}

#: Where the fallback warning and the error point users who want their architecture served.
SUPPORT_HINT = (
    "To ask for support, open an issue at the trl-prefix-share repository naming the model type; "
    "`on_unsupported_model='error'` raises instead of falling back."
)

_UNSET = object()


@dataclass
class ModelStructure:
    """The structural verdict on one model: the reasons it cannot be packed exactly (empty: served)."""

    model_name: str
    reasons: list[str] = field(default_factory=list)
    windows: dict[int, int | None] = field(default_factory=dict)

    @property
    def served(self) -> bool:
        return not self.reasons

    def describe(self) -> str:
        return f"{self.model_name} " + "; ".join(self.reasons)


def layer_windows(text_config, num_layers: int) -> tuple[dict[int, int | None], list[str]]:
    """Each layer's sliding window as transformers' masks apply it, and the reasons it cannot be determined."""
    window = positive_window(getattr(text_config, "sliding_window", None))
    layer_types = getattr(text_config, "layer_types", None)
    problems: list[str] = []
    if layer_types:
        windows: dict[int, int | None] = {}
        for index, kind in enumerate(layer_types):
            if kind == "sliding_attention":
                if window is None:
                    problems.append(f"has sliding-attention layers but no `sliding_window` size (layer {index})")
                windows[index] = window
            else:
                windows[index] = None
        return windows, problems
    if getattr(text_config, "use_sliding_window", True) is False:
        window = None
    # No per-layer types: transformers builds one sliding-window mask for every layer from `sliding_window`.
    return {index: window for index in range(num_layers)}, problems


def _unserved_layer_types(text_config, mixer_layers: set[int]) -> list[str]:
    """Layer types that are neither attention nor a mixer layer holding a served mixer."""
    layer_types = getattr(text_config, "layer_types", None) or []
    return sorted(
        {
            kind
            for index, kind in enumerate(layer_types)
            if kind not in SERVED_LAYER_TYPES and not (kind in MIXER_LAYER_TYPES and index in mixer_layers)
        }
    )


def text_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder that runs the tokens (a vision or audio tower's convolutions mix no text positions)."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def _calls_with_keywords(parent: torch.nn.Module, attribute: str) -> bool:
    """Whether ``parent.forward`` calls ``self.<attribute>(...)`` passing its ``**kwargs`` on (how the packed layout
    reaches a mixer, also when gradient checkpointing recomputes the layer)."""
    return calls_passing_kwargs(type(parent), attribute)


def served_mixers(module: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], list[str]]:
    """The state-carrying mixers under ``module`` that the segmented run serves (by qualified name), and the reasons
    the others are not served."""
    served: dict[str, torch.nn.Module] = {}
    reasons: list[str] = []
    parents = dict(module.named_modules())
    for name, child in module.named_modules():
        verdict = mixer_verdict(child)
        if verdict is None:
            continue
        parent_name, _, attribute = name.rpartition(".")
        if not verdict.served:
            reasons.append(verdict.reason)
        elif not _calls_with_keywords(parents[parent_name], attribute):
            reasons.append(f"{type(parents[parent_name]).__name__} calls its {verdict.name} without its `**kwargs`")
        else:
            served[name] = child
    return served, sorted(set(reasons))


def stateful_mixers(module: torch.nn.Module) -> list[str]:
    """Class names of the modules under ``module`` that mix positions through a state and are not served mixers (nor
    inside or holding one): torch convolutions and classes whose name says Mamba, SSM, convolution, linear / gated-delta
    attention or a recurrence. (transformers' ``Conv1D`` is GPT-2's linear layer, not a convolution.)"""
    served, _ = served_mixers(module)
    inside_served = {id(sub) for mixer in served.values() for sub in mixer.modules()}
    # Every ancestor of a served mixer ("model.layers.0" of "model.layers.0.conv") is only its container.
    holding_served = {".".join(name.split(".")[:depth]) for name in served for depth in range(name.count(".") + 1)}
    found = set()
    for name, child in module.named_modules():
        if isinstance(child, TransformersConv1D) or id(child) in inside_served or name in holding_served:
            continue
        class_name = type(child).__name__
        words = class_words(class_name)
        named_like_a_mixer = (
            STATEFUL_MIXER_PATTERN.search(words)
            and not NOT_A_MIXER_PATTERN.search(words)
            # attention that goes through transformers' interface (``KimiLinearAttention`` is MLA) gets our kernels
            and "ALL_ATTENTION_FUNCTIONS" not in forward_source(type(child))
        )
        if isinstance(child, torch.nn.Conv1d | torch.nn.Conv2d) or named_like_a_mixer:
            found.add(class_name)
    return sorted(found)


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules that call an attention function: named ``*Attention*`` and holding a ``layer_idx``."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if "attention" in type(module).__name__.lower() and isinstance(getattr(module, "layer_idx", None), int)
    ]


def _passes(module: torch.nn.Module, keyword: str) -> bool:
    """Whether the module's forward (or a helper it calls) hands ``keyword=`` to a call (read from its code)."""
    return forward_facts(type(module)).passes(keyword)


def _layers_dropping_the_layout(model: torch.nn.Module, attention) -> list[str]:
    """The packed layout reaches an attention layer through its parent's ``**kwargs``. A parent whose forward calls
    the layer without passing them on (Falcon's decoder layer in transformers 5.25) would run plain causal attention
    over the packed rows; refused here, before any forward (the packed forward also refuses a layout no layer read)."""
    modules = dict(model.named_modules())
    dropped = set()
    for name, _ in attention:
        parent_name, _, attribute = name.rpartition(".")
        parent_class = type(modules[parent_name])
        if calls_attribute(parent_class, attribute) and not calls_passing_kwargs(parent_class, attribute):
            dropped.add(f"{parent_class.__name__}.{attribute}")
    if not dropped:
        return []
    return [
        f"calls its attention without passing `**kwargs` on ({', '.join(sorted(dropped))}), so the packed layout "
        "cannot reach it"
    ]


def _unpassed_softmax_terms(model, text_config, attention) -> list[str]:
    """Attention sinks and logit soft-capping are served (the kernels implement both) when every attention layer
    hands them to the attention function as `s_aux` / `softcap`, the keywords the kernels read. A layer that applies
    them some other way would have them silently dropped, so it is refused."""
    reasons = []
    with_sinks = [m for m in model.modules() if isinstance(getattr(m, "sinks", None), torch.nn.Parameter)]
    if any(not _passes(module, "s_aux") for module in with_sinks):
        reasons.append("adds attention sinks to its softmax (`sinks`) without passing them as `s_aux`")
    softcapped = getattr(text_config, "attn_logit_softcapping", None) not in (None, False, 0)
    if softcapped and (not attention or any(not _passes(module, "softcap") for _, module in attention)):
        reasons.append("soft-caps its attention logits (`attn_logit_softcapping`) without passing `softcap`")
    if any(name.split(".")[-1] == "s_aux" for name, _ in model.named_parameters()):
        reasons.append("keeps attention sinks as an `s_aux` parameter, a layout the kernels do not read")
    return reasons


def inspect_model(model: torch.nn.Module) -> ModelStructure:
    """Read the model's structure; no forward is run, no parameter is touched (sharded weights are fine)."""
    config = model.config
    text_config = config.get_text_config()
    structure = ModelStructure(type(model).__name__)
    reasons = structure.reasons
    if getattr(config, "is_encoder_decoder", False) or getattr(text_config, "is_encoder_decoder", False):
        reasons.append("is an encoder-decoder model (prefix sharing packs decoder-only sequences)")
    if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        reasons.append("does not route its attention through transformers' `AttentionInterface`")
    for flag, reason in UNSERVED_CONFIG_FLAGS.items():
        value = getattr(text_config, flag, None)
        if value not in (None, False, 0):
            reasons.append(reason)
    backbone = text_backbone(model)
    served, mixer_reasons = served_mixers(backbone)
    mixer_layers = {getattr(mixer, "layer_idx", None) for mixer in served.values()}
    unserved_types = _unserved_layer_types(text_config, mixer_layers)
    if unserved_types:
        reasons.append(f"has layers of type {', '.join(unserved_types)} (`layer_types`), not attention")
    reasons.extend(mixer_reasons)
    mixers = stateful_mixers(backbone)
    if mixers:
        shown = ", ".join(mixers[:4]) + (f" and {len(mixers) - 4} more" if len(mixers) > 4 else "")
        reasons.append(
            f"has token mixers that carry a state along the sequence ({shown}): convolution, SSM or linear attention"
        )
    attention = _attention_modules(model)
    reasons.extend(_unpassed_softmax_terms(model, text_config, attention))
    reasons.extend(_layers_dropping_the_layout(model, attention))
    if any(getattr(module, "is_causal", True) is False for _, module in attention):
        reasons.append("has attention layers that are not causal (`is_causal=False`)")
    num_layers = max((module.layer_idx for _, module in attention), default=-1) + 1
    windows, problems = layer_windows(text_config, num_layers)
    reasons.extend(problems)
    if not attention and any(window is not None for window in windows.values()):
        reasons.append("has sliding windows but no attention layer with a `layer_idx` to carry them")
    for name, module in attention:
        expected = windows.get(module.layer_idx)
        own = getattr(module, "sliding_window", _UNSET)
        if own is not _UNSET and not callable(own) and positive_window(own) != expected:
            reasons.append(
                f"has a sliding window on layer {name} ({own}) that differs from its config's ({expected}), so the "
                "window its masks use cannot be determined"
            )
    structure.windows = windows
    return structure


def stamp_layer_windows(model: torch.nn.Module, windows: dict[int, int | None]) -> None:
    """Record each attention module's window on it (``prefix_share_window``), read by the packed kernels."""
    for _, module in _attention_modules(model):
        setattr(module, WINDOW_ATTRIBUTE, windows.get(module.layer_idx))

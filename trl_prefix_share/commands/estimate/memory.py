"""Peak memory of a training step, stock TRL vs ours, predicted from the model's sizes and the step's token counts.

A step's memory above its start (weights and optimizer state in place) peaks at one of three moments; which one
depends on the step's sizes, so the prediction is the largest of the three:

- ``head``: the LM head's backward, the first thing the backward runs. TRL's chunked log-prob head recomputes its
  logits in tiles of ``min(scored positions, token tile) x min(vocabulary, vocabulary tile)`` values and, on a device
  without Triton, holds `HEAD_TILE_COPIES` such tiles at once (its tile buffer and the logits, log-probabilities,
  probabilities, gradient, target mask and its float copy that its torch fallback allocates), next to the head's
  weight gradient, the checkpointed inputs of every layer (gradient checkpointing: one hidden row per token and layer,
  plus the embedding output and the final norm's input) and three hidden rows per scored position (the head's input,
  its gradient, and the copy the head's slice makes). Stock TRL scores every position of its padded rows on a device
  without Triton; ours scores the labelled positions only.
- ``layer``: the recomputed bottom layer's backward, with the other layers' gradients and the head's in place. A
  recomputed dense layer holds ``6 x intermediate`` (gate, up, activation, product and two gradients at the MLP's
  product) and ``13 x hidden`` values per token (norm outputs, queries, attention output, residuals and their
  gradients); ours also holds the keys and values its CPU kernel gathers for the branches' attention groups. A
  gated-delta layer (Qwen3.5, Qwen3-Next) on our unpadded run holds more (`GATED_DELTA_ROWS`: its projections and
  convolution, the chunked scan's per-chunk pair matrices and per-step states, and their gradients): the layer term
  takes the larger of the two kinds a model has.
- ``end``: the last parameter gradients: every gradient, plus the embedding's dense gradient when it is tied to the
  head (it is added to the head's). The optimizer step (fused AdamW, TRL's default) adds nothing above this.

The constants were counted from TRL 1.16's fallback head and a dense decoder layer, and checked against torch's exact
allocation peaks (`bench --sweep`, which reports the prediction next to the measurement): they hold for fp32 training
on CPU with gradient checkpointing on (TRL's default). Other settings are not modelled, nor are mixers other than
attention and the gated delta rule (Mamba2, Kimi delta, short convolutions): the prediction says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Tiles of the head's logits TRL's torch fallback holds at once in its backward (see the module docstring): the tile
#: buffer, y, z, log_p, p, grad, the float copy of the target mask and its difference (1 each) and the mask (1/4).
HEAD_TILE_COPIES = 8.25
#: Hidden rows per scored position in the head's backward: its input, its gradient and the contiguous copy.
HEAD_ROWS_PER_SCORED = 3
#: Hidden rows per token kept besides one per layer (gradient checkpointing): the embedding output, the final norm's.
EXTRA_SAVED_ROWS = 2
#: Values per token of a recomputed dense layer's backward, in units of the MLP's intermediate and the hidden width.
LAYER_INTERMEDIATE_ROWS = 6
LAYER_HIDDEN_ROWS = 13
#: TRL 1.16's head tiles (read from TRL when it has them).
TOKEN_TILE, VOCAB_TILE = 4096, 32768
#: Values per token of a recomputed gated-delta layer's backward on our unpadded run, besides the MLP's
#: ``LAYER_INTERMEDIATE_ROWS x intermediate``: per unit of the hidden width, of value heads x chunk (the scan's pair
#: matrices), of value heads x key dim and x value dim (queries, keys and values repeated to the value heads, their
#: chunked and corrected forms), of value heads x key dim x value dim / chunk (the state after each chunk step) and of
#: key heads x key dim (projection and convolution before the repeat). Fitted to torch's allocation peaks of seven
#: Qwen3.5-text shapes (hidden 384-512, 2-8 key / 8-16 value heads, head dims 32-128) at 2k-4k tokens, every one within
#: 1 % (`benchmarks/calibrate_mixer_memory.py`); checked out of sample in docs/benchmarks.md.
GATED_DELTA_ROWS = {"hidden": 9.4, "pairs": 7.4, "keys": 8.2, "values": 8.7, "states": 2.6, "key_heads": 5.8}
#: Mixer kinds whose layers the prediction covers (`core.mixers.kinds`); others are named as not modelled.
MODELLED_MIXERS = frozenset({"gated_delta"})
#: The gated-delta mixer's attributes (transformers' Qwen3.5 / Qwen3-Next modules) giving its sizes.
GATED_DELTA_SIZES = ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim")


def head_tiles() -> tuple[int, int]:
    """(token tile, vocabulary tile) of TRL's chunked log-prob head: TRL's own values, else 1.16's."""
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError:
        return TOKEN_TILE, VOCAB_TILE
    return int(TOKEN_CHUNK_SIZE), int(_CHUNKED_LOGPROB_CHUNK_SIZE)


@dataclass(frozen=True)
class ModelSizes:
    """The sizes of a causal LM that its training step's memory depends on."""

    parameters: int
    layer_parameters: int  # the largest decoder layer's
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    kv_width: int  # key (and value) values per token: KV heads x head dim
    tied_embeddings: bool
    bytes_per_value: int = 4
    query_width: int = 0  # query values per token (attention heads x head dim); 0: the hidden width
    #: (key heads, value heads, key dim, value dim) of the widest gated-delta mixer; None: the model has none.
    gated_delta: tuple[int, int, int, int] | None = None
    #: Token mixers besides attention and the gated delta rule (their layers' memory is not modelled).
    unmodelled_mixers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.query_width:
            object.__setattr__(self, "query_width", self.hidden)

    @property
    def layer_values(self) -> float:
        """Values per token of the recomputed bottom layer's backward: a dense layer's, or a gated-delta layer's
        where the model has one (the larger)."""
        dense = LAYER_INTERMEDIATE_ROWS * self.intermediate + LAYER_HIDDEN_ROWS * self.hidden
        if self.gated_delta is None:
            return float(dense)
        from trl_prefix_share.core.mixers.ragged_plan import DELTA_CHUNK

        key_heads, value_heads, key_dim, value_dim = self.gated_delta
        rows = GATED_DELTA_ROWS
        mixer = (
            rows["hidden"] * self.hidden
            + rows["pairs"] * value_heads * DELTA_CHUNK
            + rows["keys"] * value_heads * key_dim
            + rows["values"] * value_heads * value_dim
            + rows["states"] * value_heads * key_dim * value_dim / DELTA_CHUNK
            + rows["key_heads"] * key_heads * key_dim
        )
        return max(float(dense), LAYER_INTERMEDIATE_ROWS * self.intermediate + mixer)

    @classmethod
    def from_model(cls, model: Any) -> ModelSizes:
        """Read the sizes off a model (a meta-device one is enough)."""
        import torch

        config = model.config.get_text_config()
        layer_lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
        # The decoder's layers: the list as long as the text config says (a vision tower's or experts' list may be
        # longer), else the longest.
        matching = [m for m in layer_lists if len(m) == getattr(config, "num_hidden_layers", None)]
        decoder_layers = matching[0] if matching else max(layer_lists, key=len) if layer_lists else []
        layer_parameters = max((sum(p.numel() for p in layer.parameters()) for layer in decoder_layers), default=0)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and head.weight is embeddings.weight
        gated_delta, unmodelled = _mixers(model)
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            layer_parameters=layer_parameters,
            vocab=int(embeddings.weight.shape[0]),
            hidden=int(config.hidden_size),
            intermediate=int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size),
            layers=len(decoder_layers),
            kv_width=kv_heads * head_dim,
            tied_embeddings=tied,
            query_width=heads * head_dim,
            gated_delta=gated_delta,
            unmodelled_mixers=unmodelled,
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> ModelSizes:
        """Sizes of a hub model or a local directory from its config alone: the model is built on the meta device
        (no weights are read or allocated)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(name_or_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model)


def _mixers(model: Any) -> tuple[tuple[int, int, int, int] | None, tuple[str, ...]]:
    """The widest gated-delta mixer's (key heads, value heads, key dim, value dim), and the class names of the
    state-carrying mixers the prediction does not model, read with the packed path's own mixer check."""
    from trl_prefix_share.core.mixers.kinds import mixer_verdict

    widest: tuple[int, int, int, int] | None = None
    unmodelled: set[str] = set()
    for module in model.modules():
        verdict = mixer_verdict(module)
        if verdict is None:
            continue
        sizes = tuple(getattr(module, name, None) for name in GATED_DELTA_SIZES)
        if verdict.kind in MODELLED_MIXERS and all(isinstance(size, int) for size in sizes):
            widest = max(widest or sizes, sizes, key=lambda s: s[1] * (s[2] + s[3]))
        else:
            unmodelled.add(verdict.name)
    return widest, tuple(sorted(unmodelled))


@dataclass(frozen=True)
class StepSizes:
    """One step's token counts: what its forward runs and what its head scores."""

    tokens: int  # tokens of the rows the forward runs (padded rows for stock, packed rows for ours)
    scored: int  # positions the LM head scores
    side_keys: int = 0  # ours on CPU: key slots gathered for the branches' attention groups (groups x longest chain)


def phase_bytes(model: ModelSizes, step: StepSizes) -> dict[str, float]:
    """Bytes above the step's start at each of its three peaks (see the module docstring)."""
    size = model.bytes_per_value
    token_tile, vocab_tile = head_tiles()
    head_gradient = model.vocab * model.hidden * size
    saved = step.tokens * (model.layers + EXTRA_SAVED_ROWS) * model.hidden * size
    head = (
        head_gradient
        + HEAD_TILE_COPIES * min(step.scored, token_tile) * min(model.vocab, vocab_tile) * size
        + saved
        + HEAD_ROWS_PER_SCORED * step.scored * model.hidden * size
    )
    layer = (
        head_gradient
        + (model.layers - 1) * model.layer_parameters * size
        + step.tokens * model.layer_values * size
        + step.side_keys * 2 * model.kv_width * size
    )
    end = model.parameters * size + (head_gradient if model.tied_embeddings else 0)
    return {"head": float(head), "layer": float(layer), "end": float(end)}


def peak_bytes(model: ModelSizes, steps: list[StepSizes]) -> tuple[float, str, StepSizes | None]:
    """The highest peak over ``steps``: (bytes, the moment it falls in, the step)."""
    best: tuple[float, str, StepSizes | None] = (0.0, "end", None)
    for step in steps:
        phases = phase_bytes(model, step)
        moment = max(phases, key=phases.__getitem__)
        if phases[moment] > best[0]:
            best = (phases[moment], moment, step)
    return best


@dataclass
class MemoryEstimate:
    """Predicted peak memory above the step's start (activations and gradients), stock vs ours, over an epoch."""

    stock_mib: float
    ours_mib: float
    stock_moment: str
    ours_moment: str
    model: ModelSizes
    assumptions: str = "fp32 on CPU, gradient checkpointing on (TRL's default), fused AdamW"

    def __post_init__(self) -> None:
        caveat = f"; {', '.join(self.model.unmodelled_mixers)} layers not modelled (their memory may be higher)"
        if self.model.unmodelled_mixers and caveat not in self.assumptions:  # once, if the estimate is copied
            self.assumptions += caveat

    @property
    def saving(self) -> float:
        """Stock's peak over ours."""
        return self.stock_mib / max(self.ours_mib, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saving": self.saving}


def estimate_memory(model: ModelSizes, stock: list[StepSizes], ours: list[StepSizes]) -> MemoryEstimate:
    """The epoch's highest step peak of stock and of ours."""
    stock_peak, stock_moment, _ = peak_bytes(model, stock)
    ours_peak, ours_moment, _ = peak_bytes(model, ours)
    return MemoryEstimate(stock_peak / 2**20, ours_peak / 2**20, stock_moment, ours_moment, model)


def side_key_slots(documents: list[list[int]]) -> int:
    """Key slots the CPU kernel gathers for the side groups of one-level documents (each a list of its sequences'
    lengths, the first the trunk): every later sequence is a group over its prompt and branch, padded to the
    longest."""
    later = [length for sequences in documents for length in sequences[1:]]
    return len(later) * max(later) if later else 0


def stock_steps(rows: np.ndarray, widths: np.ndarray) -> list[StepSizes]:
    """Stock TRL's steps on a device without Triton: its head scores every position of its padded rows."""
    return [StepSizes(int(r * w), int(r * (w - 1))) for r, w in zip(rows, widths, strict=True)]


def memory_lines(estimates: list[tuple[int, MemoryEstimate | None]]) -> list[str]:
    """The predicted peak step memory, one line per batch size (none without the model's sizes)."""
    known = [(batch, memory) for batch, memory in estimates if memory is not None]
    if not known:
        return []
    lines = ["", f"peak step memory above the start (predicted; {known[0][1].assumptions}):"]
    for batch, memory in known:
        lines.append(
            f"  batch {batch}: stock {memory.stock_mib:,.0f} MiB ({memory.stock_moment}), ours {memory.ours_mib:,.0f}"
            f" MiB ({memory.ours_moment}): {memory.saving:.2f}x less"
        )
    return lines

"""Models for the benchmark: a named model, or a randomly initialised one built from a config (no download)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelShape:
    """The architecture of a benchmark model built from a config."""

    family: str = "llama"
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 4
    intermediate: int | None = None
    tie_embeddings: bool = False
    #: Further config fields of the family (a hybrid's mixer sizes), as ``(name, value)`` pairs.
    extra_config: tuple[tuple[str, object], ...] = ()

    def describe(self) -> str:
        tied = ", tied embeddings" if self.tie_embeddings else ""
        return f"{self.family} {self.layers}x{self.hidden} ({self.heads} heads, {self.kv_heads} kv{tied})"


#: Qwen3.5's text model scaled to a CPU: its layer pattern (three gated-delta layers, then one attention layer), its
#: head ratios (twice as many value heads as key heads; GQA attention) at 1/8 of the default 4096 width, 16 layers: a
#: body of ~55M parameters, so that (as with SmolLM-135M for dense models) the body, not the LM head, is the step.
QWEN3_5_SCALED = ModelShape(
    "qwen3_5_text",
    16,
    512,
    8,
    2,
    1536,
    tie_embeddings=True,
    extra_config=(
        ("head_dim", 64),
        ("linear_num_key_heads", 4),
        ("linear_num_value_heads", 8),
        ("linear_key_head_dim", 64),
        ("linear_value_head_dim", 64),
    ),
)


#: Nemotron-H's hybrid pattern scaled to a CPU: Mamba2 mixers and MLPs alternating, an attention layer in every
#: third pair (Nemotron-H interleaves a few attention layers among its Mamba2 / MLP blocks), width 512, Mamba2 heads
#: of 64 with a 64-wide state in 2 groups (the 8B's ratios, fewer heads), 12 blocks, tied embeddings.
NEMOTRON_H_SCALED = ModelShape(
    "nemotron_h",
    12,
    512,
    8,
    2,
    1536,
    tie_embeddings=True,
    extra_config=(
        ("layers_block_type", ["mamba", "mlp", "mamba", "mlp", "attention", "mlp"] * 2),
        ("head_dim", 64),
        ("mamba_num_heads", 16),
        ("mamba_head_dim", 64),
        ("ssm_state_size", 64),
        ("n_groups", 2),
    ),
)


#: Shapes by name. All but "tiny" and the two "-scaled" hybrids copy a published config's sizes (vocab comes from the
#: tokenizer): "smollm-135m" is the model family of the shared SmolLM tokenizer, a real model body whose DPO step still
#: takes 20-110 s on a 2-core CPU (stock TRL's included), so a full ablation fits in an hour there.
PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(),
    "smollm-135m": ModelShape("llama", 30, 576, 9, 3, 1536, tie_embeddings=True),
    "qwen2.5-0.5b": ModelShape("qwen2", 24, 896, 14, 2, 4864, tie_embeddings=True),
    "qwen2.5-1.5b": ModelShape("qwen2", 28, 1536, 12, 2, 8960, tie_embeddings=True),
    "qwen3.5-scaled": QWEN3_5_SCALED,
    "nemotron-h-scaled": NEMOTRON_H_SCALED,
}


def build_model_dir(
    shape: ModelShape,
    tokenizer: PreTrainedTokenizerBase,
    reward: bool,
    seed: int,
    dtype: torch.dtype,
    max_positions: int = 4096,
) -> str:
    """Save a randomly initialised model of ``shape`` (and the tokenizer) to a temporary directory; return its path.

    Passing a path (not a model object) lets every trainer load its own copy and build its reference model the way
    it does for a user's model."""
    config = AutoConfig.for_model(
        shape.family,
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate or 4 * shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        num_labels=1,
        tie_word_embeddings=shape.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **dict(shape.extra_config),
    )
    torch.manual_seed(seed)
    model_class = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = model_class.from_config(config).to(dtype)
    path = tempfile.mkdtemp(prefix="trl-prefix-share-bench-model-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

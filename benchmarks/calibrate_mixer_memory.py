"""Fit the gated-delta layer's memory constants (`estimate.memory.GATED_DELTA_ROWS`) to torch's allocation peaks.

Runs ours (GRPO, 2 completions of 32 tokens, gradient checkpointing on, fp32, CPU) on Qwen3.5-text shapes that vary
the hidden width and the mixer's heads and head dims, at prompts long enough that the recomputed bottom layer's
backward is the step's peak. Each run's peak above the step's start, less what the layer moment holds besides the
layer (`estimate.memory.phase_bytes` with the layer's values set to zero), divided by the tokens, is that layer's
values per token; a least-squares fit over the shapes gives one constant per size term. Prints the fit, each shape's
residual, and how far the shipped constants' prediction is from each peak.

    OMP_NUM_THREADS=2 python benchmarks/calibrate_mixer_memory.py      # about 8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import numpy as np
import torch
import transformers

from trl_prefix_share.commands.bench.models import QWEN3_5_SCALED, ModelShape
from trl_prefix_share.commands.bench.sweep import SweepSettings, run_sweep
from trl_prefix_share.commands.estimate.memory import GATED_DELTA_ROWS, LAYER_INTERMEDIATE_ROWS
from trl_prefix_share.core.mixers.ragged_plan import DELTA_CHUNK

TOKENIZER = "../shared/tokenizers/smollm"
#: (prompt length, hidden, intermediate, key heads, value heads, key dim, value dim): 4 layers each (3 gated-delta, 1
#: attention), the first one twice at two lengths.
SHAPES = [
    (4096, 512, 1536, 4, 8, 64, 64),
    (2048, 512, 1536, 4, 8, 64, 64),
    (4096, 512, 1536, 4, 16, 32, 64),
    (4096, 512, 1536, 8, 8, 128, 32),
    (4096, 384, 1024, 4, 8, 64, 64),
    (4096, 512, 1536, 4, 8, 128, 128),
    (4096, 512, 1536, 2, 8, 64, 64),
    (4096, 512, 1536, 4, 8, 32, 128),
]
TERMS = ("hidden", "pairs", "keys", "values", "states", "key_heads")


def shape_of(hidden: int, intermediate: int, key_heads: int, value_heads: int, key_dim: int, value_dim: int):
    extra = dict(QWEN3_5_SCALED.extra_config)
    extra.update(
        linear_num_key_heads=key_heads,
        linear_num_value_heads=value_heads,
        linear_key_head_dim=key_dim,
        linear_value_head_dim=value_dim,
    )
    return dataclasses.replace(
        QWEN3_5_SCALED, layers=4, hidden=hidden, intermediate=intermediate, extra_config=tuple(extra.items())
    )


def term_sizes(hidden: int, key_heads: int, value_heads: int, key_dim: int, value_dim: int) -> list[float]:
    """The size each constant multiplies, in `GATED_DELTA_ROWS`' order."""
    return [
        hidden,
        value_heads * DELTA_CHUNK,
        value_heads * key_dim,
        value_heads * value_dim,
        value_heads * key_dim * value_dim / DELTA_CHUNK,
        key_heads * key_dim,
    ]


def measure(prompt_length: int, shape: ModelShape, tokenizer: str) -> tuple[float, float, float]:
    """(peak MiB above the step's start, tokens per step, the shipped constants' predicted peak MiB)."""
    settings = SweepSettings(
        kinds=["grpo"],
        prompt_lengths=[prompt_length],
        completions=[2],
        completion_length=32,
        variants=["ours"],
        tokenizer=tokenizer,
        shape=shape,
        steps=1,
        warmup=1,
        time_cap_s=None,
        device="cpu",
    )
    result = run_sweep(settings, log=lambda line: None)
    (run,), (cell,) = result["runs"], result["cells"]
    return run.training_memory_mib, run.tokens_per_step, cell["predicted_memory_ours_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=TOKENIZER)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")

    features, targets, report = [], [], []
    for prompt_length, hidden, intermediate, *mixer in SHAPES:
        shape = shape_of(hidden, intermediate, *mixer)
        measured, tokens, predicted = measure(prompt_length, shape, args.tokenizer)
        sizes = term_sizes(hidden, *mixer)
        mixer_values = sum(GATED_DELTA_ROWS[term] * size for term, size in zip(TERMS, sizes, strict=True))
        shipped = LAYER_INTERMEDIATE_ROWS * intermediate + mixer_values
        # The prediction's layer moment less its layer values is what the moment holds besides the layer.
        besides_layer = predicted * 2**20 - tokens * shipped * 4
        values = (measured * 2**20 - besides_layer) / (tokens * 4) - LAYER_INTERMEDIATE_ROWS * intermediate
        features.append(sizes)
        targets.append(values)
        report.append((prompt_length, hidden, intermediate, *mixer, measured, predicted))
        print(f"L {prompt_length} hidden {hidden} heads {mixer}: peak {measured:.1f} MiB, predicted {predicted:.1f}")
    x, y = np.array(features, dtype=float), np.array(targets)
    fit, *_ = np.linalg.lstsq(x, y, rcond=None)
    print("\nfitted values per token:", {term: round(float(c), 2) for term, c in zip(TERMS, fit, strict=True)})
    print("shipped:", GATED_DELTA_ROWS)
    for row, fitted, target in zip(report, x @ fit, y, strict=True):
        *case, measured, predicted = row
        print(f"  {case}: fit residual {fitted / target - 1:+.1%}, shipped prediction {predicted / measured - 1:+.1%}")


if __name__ == "__main__":
    main()

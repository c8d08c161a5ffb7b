"""Shared set-up of the online-RL tests: real prompts, a deterministic reward, stock and prefix-shared trainers built
alike, and one generation batch scored by both (same seed, so the same completions)."""

from __future__ import annotations

import torch
from conftest import read_jsonl
from datasets import Dataset
from equivalence import cpu_args

#: Completions per prompt and the longest completion in these tests.
NUM_GENERATIONS = 4
MAX_COMPLETION_LENGTH = 8


def real_prompts(count: int, offset: int = 0, conversational: bool = False) -> Dataset:
    """UltraFeedback prompts (shortened to keep CPU runs quick), plain or as chat messages."""
    rows = read_jsonl("ultrafeedback", count, offset)
    if conversational:
        return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"][:160]}]} for r in rows])
    return Dataset.from_list([{"prompt": r["prompt"][:160]} for r in rows])


def vowel_reward(completions, **kwargs) -> list[float]:
    """Deterministic reward: vowels in the completion (text or chat message)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(sum(text.count(v) for v in "aeiou")) for text in texts]


def online_args(config_cls, **fields):
    """`equivalence.cpu_args` for GRPO / RLOO: G=4 completions of at most 8 tokens, two prompts per step."""
    defaults = dict(
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH,
        learning_rate=1e-2,
        logging_steps=1,
    )
    batch = fields.pop("per_device_train_batch_size", 2 * NUM_GENERATIONS)
    return cpu_args(config_cls, batch, **{**defaults, **fields})


def generation_batch(dataset: Dataset, prompts: int) -> list[dict]:
    """What TRL's sampler hands `_generate_and_score_completions`: each prompt repeated `num_generations` times."""
    return [dataset[i] for i in range(prompts) for _ in range(NUM_GENERATIONS)]


def generate_and_score(trainer, batch: list[dict], seed: int = 0) -> dict:
    """One seeded generation + scoring step (old-policy and reference passes included)."""
    torch.manual_seed(seed)
    trainer.model.train()
    return trainer._generate_and_score_completions(batch)

"""Reward functions for the GRPO / RLOO recipes, by import path (`reward_funcs: [recipes.rewards.vowel_reward]`).

TRL calls each with the completions and every dataset column as keyword arguments and expects one float per
completion. Deterministic, so runs can be compared.
"""

from __future__ import annotations


def _text(completion) -> str:
    """A completion as text: plain, or the last message of a conversational completion."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def vowel_reward(completions, **kwargs) -> list[float]:
    """Vowels in the completion: a toy signal for smoke runs."""
    return [float(sum(_text(c).count(v) for v in "aeiou")) for c in completions]


def concise_reward(completions, target_words: int = 40, **kwargs) -> list[float]:
    """1 at `target_words` words, falling linearly to 0 at twice (or zero) that length."""
    scores = []
    for completion in completions:
        words = len(_text(completion).split())
        scores.append(max(0.0, 1.0 - abs(words - target_words) / target_words))
    return scores

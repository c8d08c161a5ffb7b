"""The compute a training step's forward does, by where it is spent, and the speed-up a layout can give at most.

Sharing a prompt removes tokens from the decoder's body and (query, key) pairs from its attention, but not a single
scored position from the LM head: every completion token is still projected onto the whole vocabulary. The token
limit (tokens run before / after) therefore overstates what sharing can buy wherever the head's work is a large part
of the step (short prompts, a large vocabulary, few layers). The compute limit counts the forward's multiply-adds
instead:

- the body: ``2 x parameters of a decoder layer x layers`` per token run;
- attention: ``4 x query width x layers`` per (query, key) pair a query attends to (scores and the weighted sum);
- the LM head: ``2 x vocabulary x hidden`` per scored position.

The backward (about twice the forward) and gradient checkpointing's recomputation repeat each part in the same
proportion, so the ratio of two layouts' forward work is the speed-up one layout can have over the other when nothing
but this arithmetic costs time. What it leaves out, the same for both layouts: the optimizer step, the trainer's
per-step work, and the elementwise work of norms and activations (a few percent of a layer's). Every decoder layer
counts as an attention layer (a hybrid's mixer layers are counted as attention ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from trl_prefix_share.commands.estimate.memory import ModelSizes


@dataclass(frozen=True)
class StepWork:
    """What one step's forward computes on: tokens run, (query, key) pairs attended, positions the head scores."""

    tokens: int
    attended_pairs: int
    scored: int

    def __add__(self, other: StepWork) -> StepWork:
        return StepWork(
            self.tokens + other.tokens, self.attended_pairs + other.attended_pairs, self.scored + other.scored
        )


def forward_flops(model: ModelSizes, work: StepWork) -> float:
    """Multiply-adds (x2) of the forward: body + attention + head."""
    body = 2 * model.layer_parameters * model.layers * work.tokens
    attention = 4 * model.query_width * model.layers * work.attended_pairs
    head = 2 * model.vocab * model.hidden * work.scored
    return float(body + attention + head)


def causal_pairs(length: int) -> int:
    """(query, key) pairs of causal attention over ``length`` tokens."""
    return length * (length + 1) // 2


def prompt_group_work(prompt: int, completions: list[int], shared: bool) -> StepWork:
    """One prompt with its completions, padding-free: run once with every completion attending to it (``shared``),
    or as one sequence per completion (packed-unshared, and stock without its padding)."""
    scored = sum(completions)
    if shared:
        pairs = causal_pairs(prompt) + sum(c * prompt + causal_pairs(c) for c in completions)
        return StepWork(prompt + scored, pairs, scored)
    pairs = sum(causal_pairs(prompt + c) for c in completions)
    return StepWork(len(completions) * prompt + scored, pairs, scored)


def compute_limit(model: ModelSizes, groups: list[tuple[int, list[int]]]) -> float:
    """Unshared forward work over shared, for prompts (token counts) each with its completions' token counts."""
    unshared = sum((prompt_group_work(p, c, shared=False) for p, c in groups), StepWork(0, 0, 0))
    shared = sum((prompt_group_work(p, c, shared=True) for p, c in groups), StepWork(0, 0, 0))
    return forward_flops(model, unshared) / forward_flops(model, shared)


def compute_lines(limits: list[tuple[int, float | None]]) -> list[str]:
    """The compute limit, one line per batch size (none without the model's sizes)."""
    known = [(batch, limit) for batch, limit in limits if limit is not None]
    if not known:
        return []
    lines = [
        "",
        "compute limit (the most sharing can speed a step up over padding-free unshared packing on this model: the",
        "LM head scores every completion token either way; forward multiply-adds over one-level documents):",
    ]
    return lines + [f"  batch {batch}: {limit:.2f}x" for batch, limit in known]

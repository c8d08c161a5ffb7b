"""`estimate --trainer grpo|rloo`: tokens of one log-prob pass, stock TRL vs prefix sharing, without a model.

A group is one prompt of P tokens and its G completions of R_g tokens. Stock TRL scores every row padded to the
micro-batch's longest prompt (left) and completion (right): B x (max P + max R). Unpadded that is sum_g (P + R_g); the
prefix-shared pass lays the prompt out once: P + sum_g (R_g + 1) (the last prompt token heads each branch). The token
limit of a group is G(P+R) / (P+GR). Given the prompts' tokens, prompts that start alike (a system prompt, the chat
template's head) are merged into prefix trees, as the trainers do for rotary models. Every pass (policy forward, old
policy when `num_iterations > 1`, reference when `beta > 0`) has the same ratio.

Completion lengths are all `max_completion_length` (what early RL steps produce, and the upper bound), or the
tokenized length of a dataset column (e.g. reference answers) capped at it. Micro-batches: the generation batch of
`batch_size x steps_per_generation` rows (whole groups of G, prompts in the sampler's seeded order) is shuffled and
split into `steps_per_generation` micro-batches, as TRL does; with 1 each micro-batch holds whole groups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from trl.data_utils import is_conversational

from trl_prefix_share.commands.estimate.counting import sampler_order, tree_tokens
from trl_prefix_share.commands.estimate.memory import (
    MemoryEstimate,
    ModelSizes,
    StepSizes,
    estimate_memory,
    memory_lines,
    side_key_slots,
    stock_steps,
)
from trl_prefix_share.commands.estimate.results import LengthStats
from trl_prefix_share.commands.estimate.tokenization import prompt_bytes
from trl_prefix_share.commands.estimate.work import compute_limit, compute_lines
from trl_prefix_share.commands.prompt_sets import prompt_token_ids as chat_prompt_ids
from trl_prefix_share.core.layout.tree import MIN_SHARED_TOKENS


@dataclass
class OnlineEstimate:
    """Token counts of one epoch's log-prob passes (one pass; multiply by the passes a config runs)."""

    prompts: int
    num_generations: int
    batch_size: int
    steps_per_generation: int
    micro_batches: int
    stock_tokens: int
    unpadded_tokens: int
    tokens: int
    prompt: LengthStats
    completion: LengthStats
    completion_source: str
    memory: MemoryEstimate | None = None  # predicted peak step memory, when the model's sizes were given
    #: The most sharing can speed a step up over packed-unshared on the model (`estimate.work`; with its sizes).
    compute_limit: float | None = None

    @property
    def ratio(self) -> float:
        return self.stock_tokens / max(self.tokens, 1)

    @property
    def unpadded_ratio(self) -> float:
        return self.unpadded_tokens / max(self.tokens, 1)

    def to_dict(self) -> dict:
        memory = None if self.memory is None else self.memory.to_dict()
        return {**asdict(self), "ratio": self.ratio, "unpadded_ratio": self.unpadded_ratio, "memory": memory}


def prompt_token_ids(dataset, tokenizer) -> list[list[int]]:
    """Prompt tokens as TRL's GRPO/RLOO tokenize them: chat template with the generation prompt, or plain text."""
    prompts = dataset["prompt"]
    if not prompts:
        return []
    if is_conversational({"prompt": prompts[0]}):
        return [chat_prompt_ids(p, tokenizer) for p in prompts]
    return tokenizer(list(prompts))["input_ids"]  # one batched call for plain text


def prompt_lengths(dataset, tokenizer) -> np.ndarray:
    """Prompt lengths, tokenized as `prompt_token_ids`."""
    return np.array([len(ids) for ids in prompt_token_ids(dataset, tokenizer)], dtype=np.int64)


def completion_lengths(dataset, tokenizer, column: str | None, max_completion_length: int) -> np.ndarray:
    """Per prompt: the tokenized length of `column` (capped), or `max_completion_length` for every prompt."""
    if column is None:
        return np.full(len(dataset), max_completion_length, dtype=np.int64)
    texts = [t if isinstance(t, str) else t[-1]["content"] for t in dataset[column]]
    lengths = np.array([len(i) for i in tokenizer(texts, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    return np.minimum(lengths + 1, max_completion_length)  # + EOS, as generation ends


def count_online_tokens(
    prompts: np.ndarray,
    completions: np.ndarray,
    num_generations: int,
    batch_size: int,
    steps_per_generation: int = 1,
    shuffle: bool = True,
    seed: int = 42,
    completion_source: str = "max_completion_length",
    prompt_ids: list[list[int]] | None = None,
    min_shared_tokens: int = MIN_SHARED_TOKENS,
    model: ModelSizes | None = None,
) -> OnlineEstimate:
    """Sum one pass's tokens over the micro-batches of one epoch (the last generation batch may be short).

    With ``prompt_ids`` (each prompt's tokens) a micro-batch's prompts are merged into prefix trees, as the trainers
    do for models that see positions through their differences (rotary models: nearly every current LM; see
    ``core/tree_support.py``): a system prompt common to them is laid out once when it holds ``min_shared_tokens``
    (``prefix_tree_min_shared_tokens``). With ``model`` (its sizes), the peak memory of the policy's step is
    predicted too (`estimate.memory`)."""
    encoded = None if prompt_ids is None else [prompt_bytes(ids) for ids in prompt_ids]
    if batch_size % num_generations and steps_per_generation == 1:
        raise ValueError(f"batch size {batch_size} is not a multiple of num_generations={num_generations}")
    order = sampler_order(len(prompts), shuffle, seed)
    rows_prompt = np.repeat(order, num_generations)  # the sampler repeats each prompt G times in a row
    generation_rows = batch_size * steps_per_generation
    rng = np.random.default_rng(seed)
    stock = unpadded = ours = micro_batches = 0
    stock_rows, stock_widths, ours_steps, work_groups = [], [], [], []
    for start in range(0, len(rows_prompt), generation_rows):
        rows = rows_prompt[start : start + generation_rows]
        if steps_per_generation > 1:
            rows = rows[rng.permutation(len(rows))]
        for micro in np.array_split(rows, max(1, -(-len(rows) // batch_size))):
            p, c = prompts[micro], completions[micro]
            stock += len(micro) * int(p.max() + c.max())
            stock_rows.append(len(micro))
            stock_widths.append(int(p.max() + c.max()))
            unpadded += int((p + c).sum())
            documents: dict[int, list[tuple[int, bytes]]] = {}  # one per distinct prompt, as the collator's
            for g, c_g in zip(micro, c, strict=True):
                documents.setdefault(int(g), []).append((int(prompts[g] + c_g), b"" if encoded is None else encoded[g]))
            if encoded is None:
                groups = np.unique(micro)
                tokens = int(prompts[groups].sum()) + int((c + 1).sum()) - len(groups)
            else:
                tokens = tree_tokens(list(documents.values()), min_shared_tokens)
            ours += tokens
            side = side_key_slots([[length for length, _ in sequences] for sequences in documents.values()])
            ours_steps.append(StepSizes(tokens, int(c.sum()), side))
            work_groups += [(int(prompts[g]), [n - int(prompts[g]) for n, _ in seq]) for g, seq in documents.items()]
            micro_batches += 1
    return OnlineEstimate(
        prompts=len(prompts),
        num_generations=num_generations,
        batch_size=batch_size,
        steps_per_generation=steps_per_generation,
        micro_batches=micro_batches,
        stock_tokens=stock,
        unpadded_tokens=unpadded,
        tokens=ours,
        prompt=LengthStats.of(prompts),
        completion=LengthStats.of(completions),
        completion_source=completion_source,
        memory=None
        if model is None
        else estimate_memory(model, stock_steps(np.array(stock_rows), np.array(stock_widths)), ours_steps),
        compute_limit=compute_limit(model, work_groups) if model is not None and work_groups else None,
    )


def format_online_report(estimates: list[OnlineEstimate], title: str) -> str:
    """A table: one line per batch size."""
    first = estimates[0]
    lines = [
        title,
        f"prompts: {first.prompts:,} ({_describe(first.prompt)} tokens); completions ({first.completion_source}): "
        f"{_describe(first.completion)} tokens; G = {first.num_generations}",
        "",
        f"{'batch':>6} {'steps/gen':>9} {'stock tokens':>14} {'unpadded':>14} {'ours':>14} {'vs stock':>9} "
        f"{'vs unpadded':>12}",
    ]
    for e in estimates:
        lines.append(
            f"{e.batch_size:>6} {e.steps_per_generation:>9} {e.stock_tokens:>14,} {e.unpadded_tokens:>14,} "
            f"{e.tokens:>14,} {e.ratio:>8.2f}x {e.unpadded_ratio:>11.2f}x"
        )
    lines += memory_lines([(e.batch_size, e.memory) for e in estimates])
    lines += compute_lines([(e.batch_size, e.compute_limit) for e in estimates])
    lines += [
        "",
        "Per log-prob pass: the policy forward (with gradients), the old-policy pass (num_iterations > 1) and the",
        "reference pass (beta > 0) each run these tokens. Generation is not counted (it is unchanged).",
    ]
    if any(e.steps_per_generation > 1 for e in estimates):
        lines.append(
            "steps_per_generation > 1: TRL shuffles the generation batch before splitting it, so a micro-batch holds"
            " only some of a prompt's completions."
        )
    return "\n".join(lines)


def _describe(stats: LengthStats) -> str:
    return f"mean {stats.mean:.0f}, median {stats.median:.0f}, p95 {stats.p95:.0f}, max {stats.max}"

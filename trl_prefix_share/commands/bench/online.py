"""`bench --trainer grpo rloo`: stock TRL vs prefix sharing for online RL, in one process, runs alternating.

Each timed step is split with TRL's own profiling (`trl.extras.profiling`, the `profiling/Time taken: ...` metrics
TRL sends to trackers): generation (`transformers.generate`) and the reward functions (`_calculate_rewards`) are the
same work on both sides; the rest of the step is the *training side* (old-policy and reference log-prob passes, the
policy forward and backward, the optimizer step), which prefix sharing speeds up. Both sides generate from the same
seed and weights, so they train on the same completions. Token figures are those our trainer logs
(`prefix_share/stock_tokens` and `prefix_share/tokens`): their ratio is the token limit of the training side.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trl_prefix_share.commands.bench.data import dataset_label, load_rows
from trl_prefix_share.commands.bench.measure import resolve_device
from trl_prefix_share.commands.bench.models import PRESETS, ModelShape, build_model_dir
from trl_prefix_share.commands.prompt_sets import prompt_only_rows, prompt_token_ids

ONLINE_KINDS = ("grpo", "rloo")
#: Prompt sets by name: (data file short name, shortest and longest prompt kept, in tokens).
PROMPT_SETS = {
    "ultrafeedback-long": ("ultrafeedback", 256, 512),
    "pandalm-short": ("pandalm", 1, 10_000),
    "ultrafeedback-tools": ("ultrafeedback_tools", 1, 10**9),
}
#: Online variants: stock TRL, ours with one-level sharing (each prompt shared by its own completions), ours.
ONLINE_VARIANTS = ("stock", "one_level", "ours")


def bench_reward(completions, **kwargs) -> list[float]:
    """Deterministic and cheap: rewards completions by their number of distinct characters."""
    return [float(len(set(c if isinstance(c, str) else c[-1]["content"]))) for c in completions]


@dataclass
class OnlineSettings:
    """What to benchmark; every run of a cell gets the same model, prompts, seed and config."""

    trainers: list[str] = field(default_factory=lambda: list(ONLINE_KINDS))
    datasets: list[str] = field(default_factory=lambda: list(PROMPT_SETS))
    tokenizer: str = ""
    model: str | None = None
    shape: ModelShape = PRESETS["smollm-135m"]
    num_generations: int = 8
    prompts_per_step: int = 2
    max_completion_length: int = 32
    steps: int = 2
    warmup: int = 1
    rounds: int = 2
    beta: float = 0.0
    gradient_checkpointing: bool = True
    seed: int = 42
    device: str = "auto"
    variants: tuple[str, ...] = ("stock", "ours")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


@dataclass
class OnlineRun:
    """Timed steps of one `train()` run: whole step, generation, rewards, and the training side (the rest)."""

    dataset: str
    kind: str
    variant: str
    round: int
    step_seconds: list[float]
    generation_seconds: list[float]
    reward_seconds: list[float]
    training_seconds: list[float]
    tokens: int
    stock_tokens: int


class TrlProfile:
    """Collects the durations TRL's `profiling_context` measures (it otherwise only reports them to trackers)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def recording(self) -> Iterator[TrlProfile]:
        from trl.extras import profiling

        original = profiling.ProfilingContext._log_metrics
        profile = self

        def record(context, duration: float) -> None:
            profile.totals[context.name] += duration
            original(context, duration)

        profiling.ProfilingContext._log_metrics = record
        try:
            yield self
        finally:
            profiling.ProfilingContext._log_metrics = original

    def generation(self) -> float:
        return sum(v for k, v in self.totals.items() if "generate" in k)

    def rewards(self) -> float:
        return sum(v for k, v in self.totals.items() if k.endswith("_calculate_rewards"))


def prompt_rows(name: str, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """Prompt-only rows of a named prompt set (filtered by prompt length) or of any prompt or preference file: plain
    or conversational prompts, or the implicit prompt of `chosen`/`rejected` (see `commands.prompt_sets`)."""
    source, shortest, longest = PROMPT_SETS.get(name, (name, 1, 10**9))
    rows, _ = prompt_only_rows(load_rows(source))
    return [row for row in rows if shortest <= len(prompt_token_ids(row["prompt"], tokenizer)) <= longest]


def _config(settings: OnlineSettings, kind: str, variant: str, output_dir: str):
    from trl import GRPOConfig, RLOOConfig

    from trl_prefix_share.trainers.online.config import PrefixSharedGRPOConfig, PrefixSharedRLOOConfig

    fields: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        max_steps=settings.warmup + settings.steps,
        beta=settings.beta,
        gradient_checkpointing=settings.gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=settings.seed,
    )
    if settings.resolved_device().type == "cuda":
        fields.update(bf16=True, model_init_kwargs={"dtype": torch.bfloat16})
    else:
        fields.update(use_cpu=True, bf16=False)
    if variant == "one_level":  # our config class, for its `prefix_tree` field
        return (PrefixSharedGRPOConfig if kind == "grpo" else PrefixSharedRLOOConfig)(**fields, prefix_tree=False)
    return (GRPOConfig if kind == "grpo" else RLOOConfig)(**fields)


def _trainer_class(kind: str, variant: str) -> type:
    from trl import GRPOTrainer, RLOOTrainer

    from trl_prefix_share.trainers.online.grpo import PrefixSharedGRPOTrainer
    from trl_prefix_share.trainers.online.rloo import PrefixSharedRLOOTrainer

    classes = {
        ("grpo", "stock"): GRPOTrainer,
        ("grpo", "ours"): PrefixSharedGRPOTrainer,
        ("rloo", "stock"): RLOOTrainer,
        ("rloo", "ours"): PrefixSharedRLOOTrainer,
    }
    return classes[(kind, "ours" if variant == "one_level" else variant)]


def run_once(settings, kind, variant, model, tokenizer, data, label, round_index) -> OnlineRun:
    """Build one trainer, train `warmup + steps` steps, and split each timed step with TRL's profiling."""
    with tempfile.TemporaryDirectory(prefix="trl-prefix-share-bench-") as output_dir:
        trainer = _trainer_class(kind, variant)(
            model=model,
            reward_funcs=bench_reward,
            args=_config(settings, kind, variant, output_dir),
            train_dataset=data,
            processing_class=tokenizer,
        )
        steps: list[tuple[float, float, float]] = []
        profile = TrlProfile()
        inner_step = trainer.training_step

        def timed_step(*args, **kwargs):
            generation, rewards = profile.generation(), profile.rewards()
            started = time.perf_counter()
            result = inner_step(*args, **kwargs)
            _synchronize(settings.resolved_device())
            steps.append(
                (time.perf_counter() - started, profile.generation() - generation, profile.rewards() - rewards)
            )
            return result

        trainer.training_step = timed_step
        torch.manual_seed(settings.seed)
        with profile.recording():
            trainer.train()
        totals = getattr(trainer, "prefix_share_totals", {"tokens": 0, "stock_tokens": 0})
        del trainer
    timed = steps[settings.warmup :]
    return OnlineRun(
        dataset=label,
        kind=kind,
        variant=variant,
        round=round_index,
        step_seconds=[s for s, _, _ in timed],
        generation_seconds=[g for _, g, _ in timed],
        reward_seconds=[r for _, _, r in timed],
        training_seconds=[s - g - r for s, g, r in timed],
        tokens=totals["tokens"],
        stock_tokens=totals["stock_tokens"],
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_online_benchmark(settings: OnlineSettings, log: Any = print) -> list[OnlineRun]:
    """Every (prompt set, trainer) cell; stock and ours alternate round by round so machine drift cancels."""
    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer)
    model = settings.model or build_model_dir(settings.shape, tokenizer, False, settings.seed, torch.float32)
    runs: list[OnlineRun] = []
    sample_size = settings.prompts_per_step * (settings.warmup + settings.steps)
    for name in settings.datasets:
        rows = prompt_rows(name, tokenizer)
        if len(rows) < sample_size:
            raise ValueError(f"{name}: {len(rows)} prompts in range, {sample_size} needed")
        data = Dataset.from_list(rows[:sample_size])
        label = dataset_label(name)
        for kind in settings.trainers:
            for round_index in range(settings.rounds):
                for variant in settings.variants:
                    run = run_once(settings, kind, variant, model, tokenizer, data, label, round_index)
                    runs.append(run)
                    gc.collect()
                    log(
                        f"  {label} {kind} round {round_index + 1} {variant:>5}: training side "
                        f"{statistics.median(run.training_seconds):.2f} s/step, whole step "
                        f"{statistics.median(run.step_seconds):.2f} s/step"
                    )
    return runs


def summarize_online(runs: list[OnlineRun]) -> list[dict[str, Any]]:
    """Per cell: seconds per step and speedups stock/ours as ratios of sums over every timed step of every round
    (each step draws prompts of other lengths, so a median of steps would pair unlike steps), and the token limit."""
    cells = []
    for dataset, kind in dict.fromkeys((r.dataset, r.kind) for r in runs):
        by_variant = {
            v: [r for r in runs if (r.dataset, r.kind, r.variant) == (dataset, kind, v)] for v in ONLINE_VARIANTS
        }

        def total(variant: str, attribute: str, cell: dict = by_variant) -> float:
            return sum(x for r in cell[variant] for x in getattr(r, attribute))

        def per_step(variant: str, attribute: str, cell: dict = by_variant) -> float:
            steps = sum(len(getattr(r, attribute)) for r in cell[variant])
            return total(variant, attribute) / max(steps, 1)

        ours = by_variant["ours"][0]
        token_limit = ours.stock_tokens / max(ours.tokens, 1)
        training = total("stock", "training_seconds") / total("ours", "training_seconds")
        cells.append(
            {
                "dataset": dataset,
                "kind": kind,
                "stock_training_s": per_step("stock", "training_seconds"),
                "ours_training_s": per_step("ours", "training_seconds"),
                "stock_step_s": per_step("stock", "step_seconds"),
                "ours_step_s": per_step("ours", "step_seconds"),
                "generation_s": per_step("stock", "generation_seconds"),
                "training_speedup": training,
                "end_to_end_speedup": total("stock", "step_seconds") / total("ours", "step_seconds"),
                "token_limit": token_limit,
                "share_of_limit": training / token_limit,
            }
        )
        if by_variant["one_level"]:
            one_level = by_variant["one_level"][0]
            cells[-1].update(
                one_level_training_s=per_step("one_level", "training_seconds"),
                one_level_speedup=total("stock", "training_seconds") / total("one_level", "training_seconds"),
                one_level_token_limit=one_level.stock_tokens / max(one_level.tokens, 1),
            )
    return cells


def format_online_table(settings: OnlineSettings, cells: list[dict[str, Any]]) -> str:
    lines = [
        f"G = {settings.num_generations}, {settings.prompts_per_step} prompts per step, completions of "
        f"{settings.max_completion_length} tokens, beta {settings.beta}",
        f"{'prompts':<20}{'trainer':<8}{'training s/step':>17}{'speedup':>9}{'token limit':>13}{'of limit':>10}"
        f"{'step s (stock/ours)':>22}{'end to end':>12}",
    ]
    for c in cells:
        lines.append(
            f"{c['dataset']:<20}{c['kind']:<8}{c['stock_training_s']:>8.2f} / {c['ours_training_s']:<6.2f}"
            f"{c['training_speedup']:>8.2f}x{c['token_limit']:>12.2f}x{c['share_of_limit']:>10.2f}"
            f"{c['stock_step_s']:>12.2f} / {c['ours_step_s']:<7.2f}{c['end_to_end_speedup']:>11.2f}x"
        )
    lines.append(
        "training side: step time minus generation and rewards (TRL's profiling); seconds are means per step, "
        "speedups ratios of sums over all timed steps; token limit: stock tokens / ours in the log-prob passes"
    )
    for c in cells:
        if "one_level_speedup" in c:
            lines.append(
                f"{c['dataset']} {c['kind']}: one-level sharing (prefix_tree=False) {c['one_level_training_s']:.2f} "
                f"s/step, {c['one_level_speedup']:.2f}x for a token limit of {c['one_level_token_limit']:.2f}x; "
                f"the tree {c['training_speedup']:.2f}x for {c['token_limit']:.2f}x"
            )
    return "\n".join(lines)


def online_payload(settings: OnlineSettings, runs: list[OnlineRun], cells: list[dict[str, Any]]) -> dict[str, Any]:
    shape = asdict(settings.shape)
    return {"settings": {**asdict(settings), "shape": shape}, "summary": cells, "runs": [asdict(r) for r in runs]}

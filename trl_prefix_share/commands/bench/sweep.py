"""`bench --sweep`: how step time and memory grow with prompt length and completions per prompt.

A grid of cells (prompt length L x completions per prompt n), for DPO (n responses to one prompt, trained as n/2
pairs; ours groups them by prompt) and GRPO (G = n completions), each cell run by stock TRL, by our packed but unshared
layout (`share_prefix=False`: the padding-free baseline) and by ours. Per cell and variant: seconds per timed step,
peak memory above the state the step starts from (activations and gradients: the part that scales with tokens; on
CPU torch's exact allocation peak, `measure.AllocationPeak`, counted on one more, untimed step after the timed ones),
the tokens of a step, and the status (`ok`, `out of memory`, `over time cap`, or `skipped`: the same variant already
went over the cap at a shorter prompt; a run whose timed steps finished before the cap is `ok`, its memory then
missing if the cap cut the memory step). Per cell: the token limit (stock / ours), the unpadded limit (unshared /
ours), the compute limit (packed-unshared's forward multiply-adds / ours, `estimate.work`: the LM head's work per
scored position is the same in both layouts, so the token limit overstates what sharing can buy where the head
weighs), the speed-ups, how much of the limits they reach, and the estimator's predictions next to the measured
figures: the token ratio, and (CPU, gradient checkpointing) the peak memories of stock and ours (`estimate.memory`).

Data, synthetic from real text: one stream of tokens of UltraFeedback's responses (the shared data), from which each
prompt takes L consecutive tokens and each completion R tokens (decoded to text, so the trainers tokenize them as
usual; a row's counts may differ from L and R by a few tokens, decoded text re-tokenizing a little differently). Each
prompt ends in "\n\nAnswer:" and each completion starts with a space, so no token merges across the boundary.
Every prompt and every completion of a cell is a different stretch of text. GRPO's completions come from a
`rollout_func` that returns those tokens, so no step spends time generating and the whole step is the training side
(policy forward and backward, optimizer).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from trl_prefix_share.commands.bench.data import load_rows
from trl_prefix_share.commands.bench.measure import (
    PeakMemory,
    StepTimer,
    TokenCountingCollator,
    intervals,
    resolve_device,
)
from trl_prefix_share.commands.bench.models import PRESETS, ModelShape, build_model_dir
from trl_prefix_share.commands.bench.runner import environment
from trl_prefix_share.commands.estimate.memory import MemoryEstimate, ModelSizes
from trl_prefix_share.commands.estimate.work import compute_limit

SWEEP_KINDS = ("dpo", "grpo")
SWEEP_VARIANTS = ("stock", "unshared", "ours")
OK, OUT_OF_MEMORY, OVER_TIME_CAP, SKIPPED = "ok", "out of memory", "over time cap", "skipped"


@dataclass
class SweepSettings:
    """The grid and how each cell runs. Every variant of a cell gets the same model, data, seed and config."""

    kinds: list[str] = field(default_factory=lambda: list(SWEEP_KINDS))
    prompt_lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])
    completions: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    completion_length: int = 64
    prompts_per_step: int = 1
    variants: list[str] = field(default_factory=lambda: list(SWEEP_VARIANTS))
    tokenizer: str = ""
    model: str | None = None
    shape: ModelShape = PRESETS["smollm-135m"]
    steps: int = 2
    warmup: int = 1
    time_cap_s: float | None = 300.0
    gradient_checkpointing: bool = True
    seed: int = 42
    device: str = "auto"

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def memory_steps(self) -> int:
        """Untimed steps after the timed ones that measure memory: one on CPU, where counting torch's allocations
        runs the profiler; none on CUDA, whose allocator keeps its own peak."""
        return 1 if self.resolved_device().type == "cpu" else 0


@dataclass
class SweepRun:
    """One variant of one cell."""

    kind: str
    prompt_length: int
    completions: int
    variant: str
    status: str
    step_seconds: list[float] = field(default_factory=list)
    tokens_per_step: float | None = None
    stock_tokens_per_step: float | None = None
    peak_memory_mib: float | None = None
    training_memory_mib: float | None = None
    compiles: int | None = None  # graphs torch.compile built during the run (FlexAttention on CUDA)
    #: The run went past the time cap (its longer prompts are skipped); with status `ok` its timed steps finished
    #: and only the memory step was cut.
    hit_cap: bool = False

    @property
    def seconds_per_step(self) -> float | None:
        return sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else None


# -- data ----------------------------------------------------------------------------------------------------------


class TextStream:
    """Consecutive stretches of real text (UltraFeedback's responses, tokenized end to end), handed out in order."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, needed_tokens: int) -> None:
        pieces, total = [], 0
        for row in itertools.cycle(load_rows("ultrafeedback")):
            for key in ("chosen", "rejected"):
                text = row[key] if isinstance(row[key], str) else row[key][-1]["content"]
                ids = tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
                pieces.append(np.asarray(ids, dtype=np.int64))
                total += len(ids)
            if total >= needed_tokens:
                break
        self.tokens = np.concatenate(pieces)
        self.tokenizer = tokenizer
        self.offset = 0

    def take(self, length: int) -> str:
        """The next ``length`` tokens as text."""
        ids = self.tokens[self.offset : self.offset + length]
        self.offset += length
        return self.tokenizer.decode(ids.tolist())


#: Every prompt ends in this text and every completion starts with a space, so no token merges across the
#: boundary: the prompt's tokens alone are the first tokens of prompt + completion, for every completion (TRL warns
#: and moves the boundary otherwise, and prompts that differ in their last token would not be shared).
PROMPT_END_TEXT = "\n\nAnswer:"


def cell_texts(settings: SweepSettings, tokenizer, prompt_length: int, completions: int, stream: TextStream):
    """Prompts (one per step, times `prompts_per_step`) and each prompt's `completions` completion texts."""
    prompts = settings.prompts_per_step * (settings.warmup + settings.steps + settings.memory_steps)
    texts = []
    ending = len(tokenizer(PROMPT_END_TEXT, add_special_tokens=False)["input_ids"])
    for _ in range(prompts):
        prompt = stream.take(prompt_length - ending).rstrip() + PROMPT_END_TEXT
        responses = [" " + stream.take(settings.completion_length).strip() for _ in range(completions)]
        texts.append((prompt, responses))
    return texts


def dpo_rows(texts: list[tuple[str, list[str]]]) -> Dataset:
    """n responses per prompt as n/2 pairs (responses 2i and 2i+1), each pair its own row, as a ranked list would."""
    rows = [
        {"prompt": prompt, "chosen": responses[i], "rejected": responses[i + 1]}
        for prompt, responses in texts
        for i in range(0, len(responses) - 1, 2)
    ]
    return Dataset.from_list(rows)


class FixedRollouts:
    """`rollout_func` of GRPO: each prompt row's completion is the next of its prompt's completion texts, tokenized,
    so every variant trains on the same completions without generating them."""

    def __init__(self, texts: list[tuple[str, list[str]]], tokenizer: PreTrainedTokenizerBase) -> None:
        self.completions = {prompt: responses for prompt, responses in texts}
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[str], trainer: Any) -> dict[str, list]:
        seen: dict[str, int] = {}
        prompt_ids, completion_ids = [], []
        for prompt in prompts:
            index = seen.get(prompt, 0)
            seen[prompt] = index + 1
            prompt_ids.append(self.tokenizer(prompt)["input_ids"])
            text = self.completions[prompt][index % len(self.completions[prompt])]
            completion_ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def sweep_reward(completions, **kwargs) -> list[float]:
    """Deterministic, cheap, and different across completions (GRPO needs a non-zero advantage to train)."""
    return [float(len(set(c if isinstance(c, str) else c[-1]["content"]))) for c in completions]


# -- runs ----------------------------------------------------------------------------------------------------------


class TimeCap(TrainerCallback):
    """Stops a run once its steps have taken longer than the cap (the step running then finishes first); a run whose
    last step ends past the cap has finished and counts as measured."""

    def __init__(self, cap_s: float | None) -> None:
        self.cap_s = cap_s
        self.started = 0.0
        self.hit = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        remaining = state.global_step < state.max_steps  # the last step done: the run finished, within the cap or not
        if self.cap_s is not None and remaining and time.perf_counter() - self.started > self.cap_s:
            self.hit = True
            control.should_training_stop = True


class _OverTimeCap(Exception):
    """Raised inside a step that is still running when the run's time is up."""


@contextlib.contextmanager
def _hard_time_limit(seconds: float | None):
    """Interrupt a run (even inside one long step) at 1.5 x ``seconds`` (at least 1 s; `TimeCap` stops it between
    steps at ``seconds``): a cell stock cannot finish in time is
    reported, and the sweep's own time stays bounded. Needs SIGALRM (Linux, macOS; main thread); elsewhere the cap is
    checked between steps only (`TimeCap`)."""
    usable = (
        seconds is not None and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise _OverTimeCap

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.5 * seconds, 1.0))  # the step cap first, this one as the backstop
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _common_config(settings: SweepSettings, output_dir: str, batch: int, max_length: int) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        max_steps=settings.warmup + settings.steps + settings.memory_steps,
        gradient_checkpointing=settings.gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=settings.seed,
        data_seed=settings.seed,
    )
    if settings.resolved_device().type == "cuda":
        fields.update(bf16=True, model_init_kwargs={"dtype": torch.bfloat16})
    else:
        fields.update(use_cpu=True, bf16=False)
    return fields


def _dpo_trainer(settings, variant, model, tokenizer, texts, output_dir):
    from trl import DPOConfig, DPOTrainer

    from trl_prefix_share.trainers.dpo.config import PrefixSharedDPOConfig
    from trl_prefix_share.trainers.dpo.trainer import PrefixSharedDPOTrainer

    pairs_per_prompt = len(texts[0][1]) // 2
    longest = max(len(tokenizer(p)["input_ids"]) for p, _ in texts) + 2 * settings.completion_length + 16
    common = _common_config(settings, output_dir, settings.prompts_per_step * pairs_per_prompt, longest)
    common["max_length"] = longest
    if variant == "stock":
        config, trainer_class = DPOConfig(**common), DPOTrainer
    else:  # both ours: the pairs of one prompt in one batch, the prompt laid out once (or, unshared, per pair)
        config = PrefixSharedDPOConfig(**common, group_by_prompt=True, share_prefix=variant == "ours")
        trainer_class = PrefixSharedDPOTrainer
    return trainer_class(model=model, args=config, train_dataset=dpo_rows(texts), processing_class=tokenizer)


def _grpo_trainer(settings, variant, model, tokenizer, texts, output_dir):
    from trl import GRPOConfig, GRPOTrainer

    from trl_prefix_share.trainers.online.config import PrefixSharedGRPOConfig
    from trl_prefix_share.trainers.online.grpo import PrefixSharedGRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16
    generations = len(texts[0][1])
    common = _common_config(settings, output_dir, settings.prompts_per_step * generations, 0)
    common.update(num_generations=generations, max_completion_length=settings.completion_length + 8, beta=0.0)
    if variant == "stock":
        config, trainer_class = GRPOConfig(**common), GRPOTrainer
    else:
        config = PrefixSharedGRPOConfig(**common, share_prefix=variant == "ours")
        trainer_class = PrefixSharedGRPOTrainer
    return trainer_class(
        model=model,
        reward_funcs=sweep_reward,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt, _ in texts]),
        processing_class=tokenizer,
        rollout_func=FixedRollouts(texts, tokenizer),
    )


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_variant(settings, kind, variant, model, tokenizer, texts, prompt_length, completions) -> SweepRun:
    """Build and train one variant of one cell; an out-of-memory error or the time cap is recorded, not raised."""
    run = SweepRun(kind, prompt_length, completions, variant, OK)
    device = settings.resolved_device()
    memory = PeakMemory(device, torch_allocations=True)
    compiles = _compiled_graphs()
    with tempfile.TemporaryDirectory(prefix="trl-prefix-share-sweep-") as output_dir:
        build = _dpo_trainer if kind == "dpo" else _grpo_trainer
        trainer = build(settings, variant, model, tokenizer, texts, output_dir)
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        counter = TokenCountingCollator(trainer.data_collator) if kind == "dpo" else None
        if counter is not None:
            trainer.data_collator = counter
        memory_after = settings.steps if settings.memory_steps else None
        timer, cap = StepTimer(memory, settings.warmup, memory_after), TimeCap(settings.time_cap_s)
        trainer.add_callback(timer)
        trainer.add_callback(cap)
        try:
            with _hard_time_limit(settings.time_cap_s):
                trainer.train()
        except torch.OutOfMemoryError:
            run.status = OUT_OF_MEMORY
        except _OverTimeCap:
            run.status = OVER_TIME_CAP
        else:
            run.status = OVER_TIME_CAP if cap.hit else OK
        run.hit_cap = run.status == OVER_TIME_CAP
        memory.finish()  # an interrupted step leaves the allocation interval open
        if len(timer.wall) > settings.warmup:
            run.step_seconds = intervals(timer.wall, settings.warmup)[: settings.steps]
        if run.hit_cap and len(run.step_seconds) == settings.steps:
            run.status = OK  # timed to the end: speed is measured, memory (the step after) is not
        if len(timer.wall) == settings.warmup + settings.steps + settings.memory_steps:
            run.peak_memory_mib, run.training_memory_mib = memory.peak_mib(), memory.growth_mib()
        timed = slice(settings.warmup, min(len(timer.wall), settings.warmup + settings.steps))
        if counter is not None and counter.ours[timed]:
            run.tokens_per_step = float(np.mean(counter.ours[timed]))
            run.stock_tokens_per_step = float(np.mean(counter.stock[timed]))
        elif counter is None and variant != "stock" and timer.wall:
            totals = trainer.prefix_share_totals  # every step, warm-up included: all steps alike in a cell
            run.tokens_per_step = totals["tokens"] / len(timer.wall)
            run.stock_tokens_per_step = totals["stock_tokens"] / len(timer.wall)
        run.compiles = _compiled_graphs() - compiles if device.type == "cuda" else None
        del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run


def cell_prediction(settings: SweepSettings, kind: str, tokenizer, texts, model: ModelSizes | None):
    """The estimator's token ratio and (with the model's sizes) peak-memory prediction for the cell (`estimate`'s
    own counting), configured as the cell's trainer runs: GRPO with G = n, DPO with its n/2 pairs per prompt grouped
    by prompt (`group_by_prompt`, as ours trains)."""
    from trl_prefix_share.commands.estimate.online import count_online_tokens, prompt_token_ids

    if kind == "grpo":
        prompt_ids = prompt_token_ids(Dataset.from_list([{"prompt": p} for p, _ in texts]), tokenizer)
        prompts = np.array([len(ids) for ids in prompt_ids], dtype=np.int64)
        completions = np.array([len(tokenizer(r[0], add_special_tokens=False)["input_ids"]) for _, r in texts])
        batch = settings.prompts_per_step * len(texts[0][1])
        count = count_online_tokens(
            prompts, completions, len(texts[0][1]), batch, shuffle=False, prompt_ids=prompt_ids, model=model
        )
        return count.ratio, count.memory
    from trl_prefix_share.commands.estimate import estimate_savings

    rows = dpo_rows(texts).to_list()
    batch = settings.prompts_per_step * (len(texts[0][1]) // 2)
    estimate = estimate_savings(
        rows, tokenizer, batch_size=batch, max_length=None, seed=settings.seed, group_by_prompt=True, model=model
    )
    return estimate.token_ratio, estimate.memory


def cell_compute_limit(tokenizer, texts, model: ModelSizes) -> float:
    """The most sharing can speed the cell's forward and backward up over packed-unshared: their multiply-adds'
    ratio (`estimate.work`), padding-free, from the cell's prompts and completions as tokenized."""
    groups = [
        (
            len(tokenizer(prompt)["input_ids"]),
            [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in responses],
        )
        for prompt, responses in texts
    ]
    return compute_limit(model, groups)


def run_sweep(settings: SweepSettings, log: Any = print) -> dict[str, Any]:
    """Every cell of the grid; the variants of a cell run one after the other on the same model and data."""
    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer)
    longest = max(settings.prompt_lengths) + settings.completion_length + 64
    model = settings.model or build_model_dir(
        settings.shape, tokenizer, False, settings.seed, torch.float32, max_positions=max(4096, longest)
    )
    # The memory prediction models fp32 on a device without Triton (stock's head scores every padded position) with
    # gradient checkpointing: other cells get none.
    predictable = settings.resolved_device().type == "cpu" and settings.gradient_checkpointing
    sizes = ModelSizes.from_pretrained(model)
    needed = max(settings.prompt_lengths) * 4 + max(settings.completions) * settings.completion_length * 4
    stream = TextStream(tokenizer, needed_tokens=needed)
    runs: list[SweepRun] = []
    cells: list[dict[str, Any]] = []
    for kind in settings.kinds:
        over_cap: set[tuple[str, int]] = set()  # (variant, completions) already over the cap at a shorter prompt
        for completions, prompt_length in itertools.product(settings.completions, sorted(settings.prompt_lengths)):
            stream.offset = 0  # every cell starts from the same text: cells differ only in their lengths
            texts = cell_texts(settings, tokenizer, prompt_length, completions, stream)
            cell_runs = {}
            for variant in settings.variants:
                if (variant, completions) in over_cap:
                    cell_runs[variant] = SweepRun(kind, prompt_length, completions, variant, SKIPPED)
                else:
                    cell_runs[variant] = run_variant(
                        settings, kind, variant, model, tokenizer, texts, prompt_length, completions
                    )
                    if cell_runs[variant].hit_cap or cell_runs[variant].status != OK:
                        over_cap.add((variant, completions))
                run = cell_runs[variant]
                seconds = "-" if run.seconds_per_step is None else f"{run.seconds_per_step:.2f} s/step"
                log(f"  {kind} L={prompt_length} n={completions} {variant:>8}: {run.status}, {seconds}")
            if kind == "grpo" and "stock" in cell_runs:  # GRPO's stock trainer logs no counts: ours name them
                counted = next((r for r in cell_runs.values() if r.stock_tokens_per_step), None)
                if counted is not None:
                    cell_runs["stock"].tokens_per_step = counted.stock_tokens_per_step
            runs.extend(cell_runs.values())
            predicted = cell_prediction(settings, kind, tokenizer, texts, sizes if predictable else None)
            cells.append(summarize_cell(cell_runs, *predicted, cell_compute_limit(tokenizer, texts, sizes)))
    return {"settings": _settings_dict(settings), "environment": environment(settings), "cells": cells, "runs": runs}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if not numerator or not denominator else numerator / denominator


def summarize_cell(
    runs: dict[str, SweepRun],
    predicted: float | None,
    memory_prediction: MemoryEstimate | None = None,
    compute: float | None = None,
) -> dict[str, Any]:
    """The cell's limits (``compute``: the compute limit of sharing over packed-unshared), speed-ups, shares of the
    limits, memory ratio and the estimator's prediction errors (token ratio; peak memory of stock, of ours and their
    ratio)."""
    any_run = next(iter(runs.values()))
    stock, unshared, ours = (runs.get(v) for v in SWEEP_VARIANTS)

    def tokens(run):  # a run stopped by the cap may have counted batches it never trained on (GRPO's rollouts)
        return None if run is None or run.status != OK else run.tokens_per_step

    def seconds(run):
        return None if run is None or run.status != OK else run.seconds_per_step

    def memory(run):
        return None if run is None or run.status != OK else run.training_memory_mib

    stock_tokens = (ours.stock_tokens_per_step if ours else None) or tokens(stock)
    token_limit = _ratio(stock_tokens, tokens(ours))
    unpadded_limit = _ratio(tokens(unshared), tokens(ours))
    speedup = _ratio(seconds(stock), seconds(ours))
    sharing_alone = _ratio(seconds(unshared), seconds(ours))
    memory_ratio = _ratio(memory(stock), memory(ours))
    # target: ours <= 1.1 x stock / token ratio, i.e. memory_ratio >= token_limit / 1.1
    in_proportion = None if memory_ratio is None or token_limit is None else memory_ratio * 1.1 >= token_limit
    return {
        "kind": any_run.kind,
        "prompt_length": any_run.prompt_length,
        "completions": any_run.completions,
        "status": {v: r.status for v, r in runs.items()},
        "token_limit": token_limit,
        "unpadded_limit": unpadded_limit,
        "speedup": speedup,
        "share_of_token_limit": _ratio(speedup, token_limit),
        "sharing_alone": sharing_alone,
        "share_of_unpadded_limit": _ratio(sharing_alone, unpadded_limit),
        "compute_limit": compute,
        "share_of_compute_limit": _ratio(sharing_alone, compute),
        "memory_ratio": memory_ratio,
        # target: ours <= 1.1 x stock / token ratio, i.e. memory_ratio >= token_limit / 1.1
        "memory_in_proportion": in_proportion,
        "predicted_token_ratio": predicted,
        "prediction_error": None if predicted is None or token_limit is None else predicted / token_limit - 1,
        **_memory_prediction(memory_prediction, memory(stock), memory(ours)),
    }


def _memory_prediction(
    prediction: MemoryEstimate | None, stock_mib: float | None, ours_mib: float | None
) -> dict[str, float | None]:
    """The estimator's predicted peaks (above the warm-up state) and their errors against the measured ones."""
    keys = ("stock_mib", "ours_mib", "error_stock", "error_ours", "error")
    if prediction is None:
        return {f"predicted_memory_{key}" if "mib" in key else f"memory_prediction_{key}": None for key in keys}

    def error(predicted: float, measured: float | None) -> float | None:
        return None if not measured else predicted / measured - 1

    measured_saving = _ratio(stock_mib, ours_mib)
    return {
        "predicted_memory_stock_mib": prediction.stock_mib,
        "predicted_memory_ours_mib": prediction.ours_mib,
        "memory_prediction_error_stock": error(prediction.stock_mib, stock_mib),
        "memory_prediction_error_ours": error(prediction.ours_mib, ours_mib),
        "memory_prediction_error": error(prediction.saving, measured_saving),
    }


def _settings_dict(settings: SweepSettings) -> dict[str, Any]:
    return {**asdict(settings), "shape": asdict(settings.shape)}


# -- output ---------------------------------------------------------------------------------------------------------


def _figure(value: float | None, unit: str = "x") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def format_sweep_table(result: dict[str, Any]) -> str:
    lines = [
        f"{'kind':<5}{'L':>7}{'n':>4}  {'status (stock/unshared/ours)':<32}{'token limit':>12}{'speed-up':>10}"
        f"{'of limit':>9}{'unpadded':>10}{'alone':>8}{'of limit':>9}{'compute':>9}{'of it':>7}{'memory':>8}"
        f"{'estimate':>10}{'mem est':>9}",
    ]
    for c in result["cells"]:
        status = "/".join(c["status"].get(v, "-") for v in SWEEP_VARIANTS)
        lines.append(
            f"{c['kind']:<5}{c['prompt_length']:>7}{c['completions']:>4}  {status:<32}{_figure(c['token_limit']):>12}"
            f"{_figure(c['speedup']):>10}{_figure(c['share_of_token_limit'], ''):>9}"
            f"{_figure(c['unpadded_limit']):>10}{_figure(c['sharing_alone']):>8}"
            f"{_figure(c['share_of_unpadded_limit'], ''):>9}{_figure(c.get('compute_limit')):>9}"
            f"{_figure(c.get('share_of_compute_limit'), ''):>7}{_figure(c['memory_ratio']):>8}"
            f"{_figure(c['predicted_token_ratio']):>10}{_figure(_predicted_saving(c)):>9}"
        )
    errors = [
        abs(c[key])
        for c in result["cells"]
        for key in ("memory_prediction_error_stock", "memory_prediction_error_ours", "memory_prediction_error")
        if c.get(key) is not None
    ]
    if errors:
        lines.append(f"memory prediction (stock, ours, their ratio): at most {max(errors):.1%} off the measured peaks")
    lines.append(
        "token limit: stock tokens / ours; unpadded: packed-unshared tokens / ours; alone: unshared s/step / ours; "
        "compute: packed-unshared's forward multiply-adds / ours (the LM head's per scored position included); "
        "memory: stock's peak above the warm-up state / ours; estimate: the estimator's predicted token limit; "
        "mem est: its predicted memory ratio"
    )
    return "\n".join(lines)


def _predicted_saving(cell: dict[str, Any]) -> float | None:
    return _ratio(cell.get("predicted_memory_stock_mib"), cell.get("predicted_memory_ours_mib"))


def write_sweep_json(result: dict[str, Any], path: Path) -> None:
    payload = {**result, "runs": [{**asdict(r), "seconds_per_step": r.seconds_per_step} for r in result["runs"]]}
    path.write_text(json.dumps(payload, indent=2, default=str))


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Per kind: speed-up vs prompt length with the token-limit curves, and peak memory vs tokens per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(c["kind"] for c in result["cells"]))
    figure, axes = plt.subplots(len(kinds), 2, figsize=(13, 4.6 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        speed, memory = axes[row]
        cells = [c for c in result["cells"] if c["kind"] == kind]
        for index, n in enumerate(sorted({c["completions"] for c in cells})):
            colour = f"C{index}"
            line = sorted((c for c in cells if c["completions"] == n), key=lambda c: c["prompt_length"])
            xs = [c["prompt_length"] for c in line]
            speed.plot(xs, [c["token_limit"] for c in line], "--", color=colour, alpha=0.6)
            compute = [(c["prompt_length"], c["compute_limit"]) for c in line if c.get("compute_limit")]
            if compute:
                speed.plot(*zip(*compute, strict=True), "-.", color=colour, alpha=0.4, lw=1)
            measured = [(c["prompt_length"], c["speedup"]) for c in line if c["speedup"] is not None]
            if measured:
                speed.plot(*zip(*measured, strict=True), "o-", color=colour, label=f"n = {n}: ours vs stock")
            alone = [(c["prompt_length"], c["sharing_alone"]) for c in line if c["sharing_alone"] is not None]
            if alone:
                speed.plot(*zip(*alone, strict=True), "s:", color=colour, label=f"n = {n}: ours vs packed-unshared")
            for c in line:
                if c["speedup"] is None and c["token_limit"] is not None:
                    speed.plot(c["prompt_length"], c["token_limit"], "x", color=colour, ms=9)
        speed.set_xscale("log", base=2)
        speed.set_xlabel("prompt tokens")
        speed.set_ylabel("speed-up (--: token limit; -.: compute limit)")
        speed.set_title(f"{kind.upper()}: speed-up vs prompt length (x: stock over the cap or out of memory)")
        if speed.get_legend_handles_labels()[0]:
            speed.legend(fontsize=8)
        runs = [r for r in result["runs"] if r.kind == kind and r.training_memory_mib and r.tokens_per_step]
        for variant, marker in (("stock", "s"), ("unshared", "^"), ("ours", "o")):
            points = [(r.tokens_per_step, r.training_memory_mib) for r in runs if r.variant == variant]
            if points:
                memory.scatter(*zip(*points, strict=True), marker=marker, label=variant)
        memory.set_xscale("log")
        memory.set_yscale("log")
        memory.set_xlabel("tokens per step")
        memory.set_ylabel("peak memory above the warm-up state (MiB)")
        memory.set_title(f"{kind.upper()}: memory vs tokens actually run")
        if memory.get_legend_handles_labels()[0]:
            memory.legend(fontsize=8)
    env = result["environment"]
    figure.suptitle(f"{env['device']}, {env['dtype']}; torch {env['torch']}, transformers {env['transformers']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
